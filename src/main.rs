//! The `mixq` binary: parses the command line and calls the library.
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    mixq::util::tune_allocator();
    let cli = mixq::cli::Cli::parse();
    match mixq::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
