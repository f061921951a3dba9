//! dr-agent: the services-machine agent. The command line is
//! [`dr_agent::cli`]; the daemon and the steps are the library.

fn main() -> std::process::ExitCode {
    dr_agent::cli::main()
}
