//! drctl: the operator's command line for dr-controller (see the `drctl` library).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use drctl::CliError;
use drctl::cli::{Args, Output};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let output = args.output;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime can start");
    match runtime.block_on(drctl::cli::run(args)) {
        Ok(code) => code,
        Err(e) => report(&e, output),
    }
}

/// The error on stderr; with `-o json` also as a JSON object on stdout.
fn report(e: &CliError, output: Output) -> ExitCode {
    eprintln!("drctl: {e}");
    if output == Output::Json {
        drctl::print::print_json(&e.to_json());
    }
    ExitCode::from(e.exit_code())
}

/// clap's own errors (and --help, --version). A script that asked for JSON
/// gets the usage error as JSON too.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand)
        || !wants_json(std::env::args().skip(1))
    {
        e.exit();
    }
    let message = e.render().to_string();
    let message = message.trim().trim_start_matches("error: ");
    report(&CliError::Usage(message.lines().next().unwrap_or(message).to_owned()), Output::Json)
}

/// Whether the raw arguments ask for `--output json` (in any spelling).
fn wants_json(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    args.iter().enumerate().any(|(i, a)| {
        matches!(a.as_str(), "--output=json" | "-ojson" | "-o=json")
            || (matches!(a.as_str(), "--output" | "-o") && args.get(i + 1).map(String::as_str) == Some("json"))
    })
}
