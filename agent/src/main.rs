use clap::Parser as _;
use meshcap_agent::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => meshcap_agent::run(*args),
        Command::Status(args) => {
            let code = meshcap_agent::status::run(&args);
            std::process::exit(code);
        }
        Command::Diagnose(args) => std::process::exit(meshcap_agent::diagnose::run(&args)),
    }
}
