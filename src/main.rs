use clap::Parser;

fn main() -> std::process::ExitCode {
    tokenrelay::commands::main(tokenrelay::commands::Cli::parse())
}
