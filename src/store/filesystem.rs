//! Which kind of filesystem holds the file store, told by the `f_type` magic number
//! `statfs(2)` reports (the values its manual page lists, from the kernel's headers).
//!
//! The file store's guarantees rest on two primitives: an exclusive `flock` (the refresh
//! lease, and the lock around compare-and-swap) and `rename` over the old file after an
//! `fsync` (the atomic, durable write). On network filesystems and FUSE neither is
//! reliable: NFS emulates `flock` with byte-range locks held through the server, which a
//! client cut off from it can lose without noticing (or, mounted with `local_lock`, keeps
//! on each client only); CIFS/SMB locks and renames follow the server's semantics and the
//! client's caching; a FUSE filesystem implements (or ignores) both however its daemon
//! chooses. Two hosts could then both hold the lease and spend the same refresh token, or
//! a crash could leave a state file the rename promised never to leave.

use std::path::Path;

/// `NFS_SUPER_MAGIC`.
pub const NFS: u32 = 0x6969;
/// `SMB_SUPER_MAGIC` (the old smbfs).
pub const SMB: u32 = 0x517B;
/// `CIFS_MAGIC_NUMBER` (cifs.ko, mounts of type `cifs`).
pub const CIFS: u32 = 0xFF53_4D42;
/// `SMB2_MAGIC_NUMBER` (cifs.ko, mounts of type `smb3`).
pub const SMB2: u32 = 0xFE53_4D42;
/// `FUSE_SUPER_MAGIC` (sshfs, s3fs, gcsfuse, rclone mount, ...).
pub const FUSE: u32 = 0x6573_5546;

/// The name of the network (or FUSE) filesystem with magic number `f_type`, if it is
/// one the file store refuses; `None` for local filesystems (ext4, xfs, btrfs, tmpfs,
/// overlayfs, ...).
pub fn network_filesystem(f_type: u32) -> Option<&'static str> {
    match f_type {
        NFS => Some("NFS"),
        SMB => Some("SMB"),
        CIFS => Some("CIFS/SMB"),
        SMB2 => Some("SMB2/SMB3"),
        FUSE => Some("FUSE"),
        _ => None,
    }
}

/// The magic number of the filesystem holding `path`.
#[cfg(target_os = "linux")]
pub fn magic(path: &Path) -> std::io::Result<u32> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    // `f_type` is a signed word whose width depends on the target; every magic number
    // fits in 32 bits, and on a 32-bit target the ones above 0x7fffffff come back
    // negative, so the low 32 bits are the number.
    Ok(st.filesystem_type().0 as u32)
}

/// The network (or FUSE) filesystem holding `path`, if any. Only Linux is checked (the
/// magic numbers are Linux's); elsewhere this is `Ok(None)`.
pub fn network_filesystem_of(path: &Path) -> std::io::Result<Option<&'static str>> {
    #[cfg(target_os = "linux")]
    {
        magic(path).map(network_filesystem)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_and_fuse_filesystems_are_named() {
        for (magic, name) in [
            (0x6969, "NFS"),
            (0x517B, "SMB"),
            (0xFF53_4D42, "CIFS/SMB"),
            (0xFE53_4D42, "SMB2/SMB3"),
            (0x6573_5546, "FUSE"),
        ] {
            assert_eq!(network_filesystem(magic), Some(name), "{magic:#x}");
        }
    }

    #[test]
    fn local_filesystems_are_not() {
        for magic in [
            0xEF53,      // ext2/3/4
            0x5846_5342, // xfs
            0x9123_683E, // btrfs
            0x0102_1994, // tmpfs
            0x794C_7630, // overlayfs
            0x2FC1_2FC1, // zfs
            0xF2F5_2010, // f2fs
            0,
        ] {
            assert_eq!(network_filesystem(magic), None, "{magic:#x}");
        }
    }

    #[test]
    fn a_negative_word_from_a_32_bit_statfs_is_read_by_its_low_bits() {
        // CIFS's magic as a 32-bit `long` would hold it: negative.
        let word: i32 = 0xFF53_4D42_u32 as i32;
        assert!(word < 0);
        assert_eq!(network_filesystem(word as u32), Some("CIFS/SMB"));
        let wide: i64 = 0xFF53_4D42;
        assert_eq!(network_filesystem(wide as u32), Some("CIFS/SMB"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_temporary_directory_is_local() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(network_filesystem_of(dir.path()).unwrap(), None);
        assert!(magic(dir.path()).is_ok());
    }
}
