//! podctl: the programs tests run inside simulated pods (servers, data sources and sinks, probing clients).
//! It is a separate executable because a process has to be started inside the pod's namespace and cgroup for the
//! agent's hooks to see it. Whatever it reports is one JSON line on stdout; usage errors go to stderr with exit 2.

mod clients;
mod load;
mod net;
mod servers;

use std::{collections::HashMap, process::ExitCode};

const USAGE: &str = "usage: podctl <command> [--flag value]...
  http-server --port P --body TEXT [--bind ADDR] [--peer-log FILE]
  echo-server --port P [--bind ADDR]
  sink --port P [--bind ADDR] [--read-delay-ms N]
  source --addr IP:PORT --bytes N [--seed S] [--timeout-ms T] [--poll-read]
  connect --addr IP:PORT [--family v4|v6] [--send TEXT] [--no-read] [--timeout-ms T] [--poll-read]
  (--poll-read: read the reply the way event-loop apps do: non-blocking reads, poll() on EAGAIN)
  http-get --url http://HOST:PORT/PATH [--timeout-ms T]
  echo-load --addr IP:PORT [--conns N] [--bytes B]   (N concurrent echo round trips of B bytes each)
  banner-server --port P --banner TEXT [--bind ADDR]   (server-first: greets, answers one line, closes)
  banner-client --addr IP:PORT [--timeout-ms T]       (reads the greeting first, then sends a line)
  reset-server --port P [--send TEXT] [--bind ADDR]   (sends TEXT, then closes with a reset)
  hold-server --port P [--bind ADDR]                  (reads to EOF, then never answers nor closes)
  tls-server --port P --cert DER --key DER [--bind A] (TLS 1.3 with the given certificate, no client auth)";

/// A subcommand: its report goes to stdout; Err is a usage error.
type Subcommand = fn(&Flags) -> Result<ExitCode, String>;

/// `--flag value` pairs (and the valueless `--no-read` and `--poll-read`), checked against the flags a command accepts.
pub struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String], allowed: &[&str]) -> Result<Flags, String> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let name = arg.strip_prefix("--").ok_or_else(|| format!("unexpected argument {arg:?}"))?;
            if !allowed.contains(&name) {
                return Err(format!("unknown flag --{name}"));
            }
            let value = if name == "no-read" || name == "poll-read" {
                String::new()
            } else {
                it.next().ok_or_else(|| format!("--{name} needs a value"))?.clone()
            };
            map.insert(name.to_string(), value);
        }
        Ok(Flags(map))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or_else(|| format!("--{name} is required"))
    }

    /// A flag parsed as `T`, or `default` when absent.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T, String> {
        match (self.get(name), default) {
            (Some(v), _) => v.parse().map_err(|_| format!("--{name}: cannot parse {v:?}")),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(format!("--{name} is required")),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let (allowed, run): (&[&str], Subcommand) = match command.as_str() {
        "http-server" => (&["port", "body", "bind", "peer-log"], servers::http_server),
        "echo-server" => (&["port", "bind"], servers::echo_server),
        "sink" => (&["port", "bind", "read-delay-ms"], servers::sink),
        "source" => (&["addr", "bytes", "seed", "timeout-ms", "poll-read"], clients::source),
        "connect" => (&["addr", "family", "send", "no-read", "timeout-ms", "poll-read"], clients::connect),
        "http-get" => (&["url", "timeout-ms"], clients::http_get),
        "echo-load" => (&["addr", "conns", "bytes"], load::echo_load),
        "banner-server" => (&["port", "banner", "bind"], servers::banner_server),
        "reset-server" => (&["port", "send", "bind"], servers::reset_server),
        "hold-server" => (&["port", "bind"], servers::hold_server),
        "tls-server" => (&["port", "cert", "key", "bind"], servers::tls_server),
        "banner-client" => (&["addr", "timeout-ms"], clients::banner_client),
        other => {
            eprintln!("podctl: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match Flags::parse(rest, allowed).and_then(|flags| run(&flags)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("podctl {command}: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
