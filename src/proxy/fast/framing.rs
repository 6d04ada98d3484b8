//! Where an HTTP/1.1 message body ends (RFC 9112 §6), tracked while the body is passed
//! through byte for byte: a fixed length, chunked coding, or the connection closing.
//! Trailer fields of a chunked body are not passed on (the general path drops them too):
//! [`Framing::emit`] says how much of what was consumed goes to the app.

/// The body of one message, as far as it has been passed on.
#[derive(Debug, Clone)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    /// `Content-Length`: bytes still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`, passed through still encoded.
    Chunked(ChunkedScanner),
    /// Delimited by the upstream closing the connection.
    UntilClose,
}

/// The body's bytes were not valid chunked coding.
#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk;

impl Framing {
    /// Of the `data` now available, how many bytes belong to this body, and whether the
    /// body ends with them.
    pub fn advance(&mut self, data: &[u8]) -> Result<(usize, bool), BadChunk> {
        match self {
            Framing::Empty => Ok((0, true)),
            Framing::Length(rest) => {
                let take = (*rest).min(data.len() as u64);
                *rest -= take;
                Ok((take as usize, *rest == 0))
            }
            Framing::Chunked(s) => match s.feed(data)? {
                Some(n) => Ok((n, true)),
                None => Ok((data.len(), false)),
            },
            Framing::UntilClose => Ok((data.len(), false)),
        }
    }

    /// Of the `used` bytes the last [`advance`](Self::advance) consumed, how many go to
    /// the app, and whether the final CRLF must be added (the trailer section, which
    /// ends with it, was left out).
    pub fn emit(&self, used: usize, done: bool) -> (usize, bool) {
        match self {
            Framing::Chunked(s) => match s.trailer_from {
                Some(k) => (k, done),
                None => (used, false),
            },
            _ => (used, false),
        }
    }

    /// Whether the body is already complete before any byte of it was seen.
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Empty | Framing::Length(0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size; `digits` so far.
    Size {
        digits: u8,
    },
    /// A chunk extension, skipped up to its CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

/// Follows chunked coding to find where it ends, without decoding it.
#[derive(Debug, Clone)]
pub struct ChunkedScanner {
    state: State,
    /// Size of the current chunk while reading its digits, then the bytes left in it.
    size: u64,
    /// Where, in the data of the last `feed`, the trailer section began (0 when it
    /// began before); the bytes from there on are not passed on.
    trailer_from: Option<usize>,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            size: 0,
            trailer_from: None,
        }
    }
}

impl ChunkedScanner {
    /// Scans `data`; `Some(n)` when the body ends after its first `n` bytes.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, BadChunk> {
        self.trailer_from = matches!(
            self.state,
            State::TrailerStart | State::TrailerLine | State::EndLf | State::Done
        )
        .then_some(0);
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Size { digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(BadChunk);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + d;
                        self.state = State::Size { digits: digits + 1 };
                    }
                    b';' | b' ' | b'\t' if digits > 0 => self.state = State::Extension,
                    b'\r' if digits > 0 => self.state = State::SizeLf,
                    _ => return Err(BadChunk),
                },
                State::Extension => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(BadChunk),
                    _ => {}
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = if self.size == 0 {
                        self.trailer_from = Some(i + 1);
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take = self.size.min((data.len() - i) as u64);
                    self.size -= take;
                    i += take as usize;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(BadChunk);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    if b == b'\n' {
                        self.state = State::TrailerStart;
                    }
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(body: &[u8], piece: usize) -> Result<Option<usize>, BadChunk> {
        let mut s = ChunkedScanner::default();
        let mut offset = 0;
        for part in body.chunks(piece) {
            if let Some(n) = s.feed(part)? {
                return Ok(Some(offset + n));
            }
            offset += part.len();
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_whatever_the_read_boundaries() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for piece in 1..body.len() {
            assert_eq!(scan_in_pieces(body, piece), Ok(Some(end)), "piece {piece}");
        }
    }

    #[test]
    fn incomplete_and_malformed_bodies() {
        assert_eq!(scan_in_pieces(b"5\r\nhel", 100), Ok(None));
        assert_eq!(scan_in_pieces(b"0\r\n", 100), Ok(None));
        assert_eq!(scan_in_pieces(b"0\r\n\r\n", 100), Ok(Some(5)));
        assert_eq!(scan_in_pieces(b"zz\r\n", 100), Err(BadChunk));
        assert_eq!(scan_in_pieces(b"\r\n", 100), Err(BadChunk));
        assert_eq!(scan_in_pieces(b"3\r\nabcX", 100), Err(BadChunk));
        assert_eq!(scan_in_pieces(b"ffffffffffffffff\r\n", 100), Err(BadChunk));
    }

    #[test]
    fn trailers_are_left_out_wherever_the_reads_split() {
        let body = b"4\r\ndata\r\n0\r\nx-sum: 1\r\n\r\n";
        for split in 1..body.len() {
            let mut f = Framing::Chunked(ChunkedScanner::default());
            let mut out = Vec::new();
            for part in [&body[..split], &body[split..]] {
                let (n, done) = f.advance(part).unwrap();
                let (emit, crlf) = f.emit(n, done);
                out.extend_from_slice(&part[..emit]);
                if crlf {
                    out.extend_from_slice(b"\r\n");
                }
            }
            assert_eq!(out, b"4\r\ndata\r\n0\r\n\r\n", "split {split}");
        }
    }

    #[test]
    fn fixed_lengths_stop_at_the_length() {
        let mut f = Framing::Length(5);
        assert_eq!(f.advance(b"abc"), Ok((3, false)));
        assert_eq!(f.advance(b"defgh"), Ok((2, true)));
        assert!(Framing::Length(0).is_done());
        assert_eq!(Framing::UntilClose.advance(b"abc"), Ok((3, false)));
    }
}
