//! `meshcap-cni`: the chained CNI plugin (run by the container runtime, with
//! `CNI_COMMAND` set), and its installer (`install` / `uninstall`, run by the
//! DaemonSet or by hand).

use std::{io::Read as _, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use meshcap_agent::{
    cli::parse_duration,
    cni::{client::UnixAgent, install, plugin, DEFAULT_AGENT_SOCKET},
};

#[derive(Parser, Debug)]
#[command(
    name = "meshcap-cni",
    version,
    about = "Chained CNI plugin: has the meshcap agent capture each pod before its apps start",
    after_help = "Run by the container runtime (CNI_COMMAND set), it is the plugin; \
                  otherwise it installs or removes itself."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy this binary into the CNI bin directory and chain it into the primary network configuration.
    Install(InstallArgs),
    /// Take meshcap-cni out of every network configuration list (and its binary out of --bin-dir, if given).
    Uninstall(UninstallArgs),
}

#[derive(Args, Debug)]
struct InstallArgs {
    /// The node's CNI plugin directory, as mounted in this container.
    #[arg(long, env = "MESHCAP_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted in this container.
    #[arg(long, env = "MESHCAP_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// The agent's CNI socket as the node sees it (the runtime runs the plugin on the node).
    #[arg(long, env = "MESHCAP_CNI_SOCKET", default_value = DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// How long the plugin waits for the agent on ADD (whole seconds, 1s to 3m).
    #[arg(long, env = "MESHCAP_CNI_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Namespaces whose pods the plugin passes through without asking the agent (comma-separated).
    #[arg(long, env = "MESHCAP_CNI_EXCLUDE_NAMESPACES", default_value = "kube-system", value_delimiter = ',')]
    exclude_namespaces: Vec<String>,
    /// Keep running and re-check every --interval (the primary CNI may rewrite its file).
    #[arg(long, env = "MESHCAP_CNI_WATCH")]
    watch: bool,
    /// How often --watch re-checks the binary and the configuration.
    #[arg(long, env = "MESHCAP_CNI_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    interval: Duration,
}

#[derive(Args, Debug)]
struct UninstallArgs {
    #[arg(long, env = "MESHCAP_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// Also remove the binary from this directory.
    #[arg(long, env = "MESHCAP_CNI_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// The plugin reads whole seconds from 1 to 180; anything else written into the list would fail every pod.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || !(1..=180).contains(&d.as_secs()) {
        return Err(format!("`{s}`: the plugin's timeout is whole seconds from 1s to 3m"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return run_plugin();
    }
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Install(args) => install(args),
        Command::Uninstall(args) => uninstall(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let output = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(|var| std::env::var(var).ok(), &stdin, &UnixAgent),
        Err(e) => plugin::stdin_failure(e),
    };
    print!("{}", output.stdout);
    for line in &output.stderr {
        eprintln!("{line}");
    }
    ExitCode::from(u8::try_from(output.exit_code).unwrap_or(1))
}

fn install(args: InstallArgs) -> anyhow::Result<()> {
    let opts = install::InstallOptions {
        source_binary: std::env::current_exe().context("locating this binary to copy it")?,
        bin_dir: args.bin_dir,
        conf_dir: args.conf_dir,
        agent_socket: args.agent_socket,
        timeout: args.timeout,
        exclude_namespaces: args.exclude_namespaces.into_iter().filter(|n| !n.is_empty()).collect(),
    };
    if args.watch {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
        return runtime.block_on(watch(opts, args.interval));
    }
    if install::install_binary(&opts.source_binary, &opts.bin_dir)? {
        tracing::info!(dir = %opts.bin_dir.display(), "installed the meshcap-cni binary");
    }
    tracing::info!("{}", install::install_config(&opts)?);
    Ok(())
}

async fn watch(opts: install::InstallOptions, interval: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        () = install::watch(opts, interval) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // See cni::install: leaving the entry keeps new pods waiting for the agent rather than starting uncaptured.
    tracing::info!(
        "stopping; meshcap-cni stays chained, so new pods wait for the agent (`meshcap-cni uninstall` removes it)"
    );
    Ok(())
}

fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let changed = install::uninstall_config(&args.conf_dir)?;
    if changed.is_empty() {
        tracing::info!(dir = %args.conf_dir.display(), "no configuration chains meshcap-cni");
    }
    for file in changed {
        tracing::info!(file = %file.display(), "removed meshcap-cni from the plugin list");
    }
    if let Some(dir) = args.bin_dir {
        if install::remove_binary(&dir)? {
            tracing::info!(dir = %dir.display(), "removed the meshcap-cni binary");
        }
    }
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}
