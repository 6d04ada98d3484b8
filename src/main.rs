use clap::Parser;

fn main() -> std::process::ExitCode {
    tokenrelay::main(tokenrelay::Cli::parse())
}
