//! `flotilla serve`, `flotilla join` and `flotilla certs`: the network deployment.

use super::progress::Progress;
use super::setup::{load_config, load_data};
use crate::run_dir::RunDir;
use anyhow::{Context, Result, bail};
use flotilla_core::device::{DeviceProfile, TierSpec};
use flotilla_engine::server_data::ServerData;
use flotilla_engine::sim::LocalFleet;
use flotilla_engine::sink::MetricsFiles;
use flotilla_engine::{ClientData, Driver};
use flotilla_net::client::{self, ClientTls, JoinOptions};
use flotilla_net::server::{self, ServeOptions, ServerTls};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Options of `flotilla serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Experiment config (TOML); not needed to resume a --state folder with a checkpoint.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free one; the bound address goes to STATE/address).
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Run directory: metrics, model, plots and the checkpoint written after every round.
    /// If it holds a checkpoint, the run resumes after its last completed round.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Dataset folder for the server's test set.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Override a config key, e.g. --set server.min_clients=10.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Bearer tokens the server accepts, one per line (`flotilla certs` writes tokens.txt).
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// Server certificate (PEM).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, requires = "cert")]
    pub client_ca: Option<PathBuf>,
    /// Serve plaintext and accept callers without a token (trusted networks and tests only).
    #[arg(long, conflicts_with_all = ["cert", "key", "client_ca"])]
    pub insecure: bool,
    /// Serve a live dashboard of the run at this address (read-only), e.g. 127.0.0.1:8080:
    /// HTTPS with --cert/--key, plain HTTP with --insecure. Beyond loopback it needs
    /// FLOTILLA_DASHBOARD_TOKEN.
    #[arg(long, value_name = "ADDR")]
    pub dashboard: Option<SocketAddr>,
}

/// Options of `flotilla join`.
#[derive(clap::Args, Debug)]
pub struct JoinArgs {
    /// Server URL: https://HOST:PORT (http:// for an --insecure server).
    #[arg(long)]
    pub server: String,
    /// Dataset folder holding this device's data.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Take share K of the run's partition of the dataset into N clients, as `K/N`
    /// (the simulator's client K). Without it the whole training set in --data-dir is this
    /// client's data.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<String>,
    /// Device profile: weak, mid, strong, or a TOML file with the fields of a fleet tier
    /// (memory_mib, gflops, uplink_mbps, downlink_mbps).
    #[arg(long)]
    pub profile: Option<String>,
    /// Bearer token.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the bearer token, in the format of the server's token file (`LABEL TOKEN
    /// IDS`, `LABEL TOKEN` or `TOKEN` per line): the first token bound to this client's id
    /// (`--partition K/N` joins as K), else the first line's.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate that signed the server's (PEM); required for https://.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Name to check the server certificate against (default: the URL's host).
    #[arg(long)]
    pub domain: Option<String>,
    /// A name for the server's logs.
    #[arg(long)]
    pub name: Option<String>,
    /// Training threads. 1 (the default) gives exactly the simulator's result; more threads
    /// train micro-batches in parallel (0: all cores), faster, with results equal to the
    /// simulator's up to the rounding of float sums.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Give up after the server has been unreachable this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub give_up: f64,
}

/// `flotilla serve`.
pub fn serve(a: ServeArgs) -> Result<()> {
    let (tls, tokens) = if a.insecure {
        tracing::warn!(
            "--insecure: plaintext, and any caller may join; use only on a trusted network"
        );
        let tokens = a
            .tokens
            .as_deref()
            .map(flotilla_net::load_tokens)
            .transpose()?;
        (None, tokens)
    } else {
        let (Some(cert), Some(key)) = (a.cert.clone(), a.key.clone()) else {
            bail!(
                "serve needs --cert and --key (TLS) and --tokens, or --insecure for plaintext; `flotilla certs --out DIR` makes them"
            );
        };
        let Some(tokens) = &a.tokens else {
            bail!(
                "serve needs --tokens FILE with the clients' bearer tokens (`flotilla certs` writes tokens.txt), or --insecure"
            );
        };
        (
            Some(ServerTls {
                cert,
                key,
                client_ca: a.client_ca.clone(),
            }),
            Some(flotilla_net::load_tokens(tokens)?),
        )
    };
    let resuming = a
        .state
        .as_ref()
        .is_some_and(|d| RunDir::new(d).has_checkpoint());
    let (exp, dir) = if resuming {
        let dir = RunDir::new(a.state.clone().expect("checked"));
        let exp = load_config(&dir.config_file(), &a.overrides)?;
        (exp, dir)
    } else {
        let config = a
            .config
            .as_deref()
            .context("--config is required (or --state with a checkpoint to resume)")?;
        let exp = load_config(config, &a.overrides)?;
        let dir = a
            .state
            .clone()
            .map_or_else(|| RunDir::fresh_for(config), RunDir::new);
        if dir.holds_run() {
            bail!(
                "{} already holds a run without a checkpoint to resume; choose another --state",
                dir.path().display()
            );
        }
        (exp, dir)
    };
    let data = load_data(&exp, a.data_dir.as_deref())?;
    let test = data.test;
    // The server's own data; a held-out slice is drawn from the training set exactly as the
    // clients' `join --partition` leaves it out.
    let server_data = ServerData::from_config(&exp, &data.train)?;
    // No client's data can be larger than the training set it is a part of.
    let max_examples = exp.server.max_examples.unwrap_or(data.train.len() as u64);
    let (server_half, _) = flotilla_methods::build(&exp)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let resolved = exp.clone();
    let dashboard = match a.dashboard {
        Some(addr) => {
            let name = flotilla_report::run_name(dir.path());
            // With TLS the dashboard shares the server's certificate and speaks HTTPS only.
            let dashboard_tls = match &tls {
                Some(t) => Some(crate::dashboard::tls_config(&t.cert, &t.key)?),
                None => None,
            };
            Some(crate::dashboard::Dashboard::start(
                addr,
                &name,
                serde_json::to_value(&exp)?,
                dashboard_tls,
            )?)
        }
        None => None,
    };
    let mut driver = Driver::new(exp, test, server_half, dir.path(), workers)?;
    if let Some(d) = server_data {
        driver.set_server_data(d);
    }
    // Linear probes (self-supervised methods) are fitted on labelled training images the
    // server holds for evaluation; a sample of `probe_examples` is kept, the rest dropped.
    driver.set_probe_data(&data.train)?;
    drop(data.train);
    dir.create()?;
    let keep = if resuming {
        let round = driver.restore_checkpoint()?;
        tracing::info!(round, "resuming after the last completed round");
        round
    } else {
        dir.write_config(&resolved)?;
        0
    };
    if let Some(d) = &dashboard {
        dir.write_dashboard_url(d.addr(), d.scheme())?;
    }
    let mut metrics = MetricsFiles::open(dir.path(), keep)?;
    let mut progress = Progress::new();
    let opts = ServeOptions {
        listen: a.listen,
        tls,
        tokens,
        max_examples: Some(max_examples),
        address_file: Some(dir.path().join("address")),
    };
    let summary = match &dashboard {
        Some(d) => {
            eprintln!("dashboard: {}", d.url());
            let mut live = d.sink();
            let members = d.sink();
            let summary = server::serve_watched(
                &mut driver,
                opts,
                &mut [&mut metrics, &mut progress, &mut live],
                &mut |m| members.members(serde_json::to_value(m).unwrap_or_default()),
            );
            if let Err(e) = &summary {
                live.failed(&e.to_string());
            }
            summary?
        }
        None => server::serve(&mut driver, opts, &mut [&mut metrics, &mut progress])?,
    };
    progress.done();
    dir.write_outputs(driver.server(), &summary)
}

fn parse_partition(s: &str) -> Result<(u64, u64)> {
    let (k, n) = s
        .split_once('/')
        .with_context(|| format!("--partition `{s}` must look like K/N, e.g. 3/10"))?;
    let k: u64 = k
        .trim()
        .parse()
        .with_context(|| format!("--partition `{s}`: K is not a number"))?;
    let n: u64 = n
        .trim()
        .parse()
        .with_context(|| format!("--partition `{s}`: N is not a number"))?;
    if k >= n {
        bail!("--partition `{s}`: K must be below N (clients are numbered 0..N-1)");
    }
    Ok((k, n))
}

fn parse_profile(p: Option<&str>) -> Result<DeviceProfile> {
    let Some(p) = p else {
        return Ok(DeviceProfile::unlimited());
    };
    if let Some(preset) = client::profile_preset(p) {
        return Ok(preset);
    }
    let path = Path::new(p);
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("--profile `{p}` is neither weak, mid, strong nor a readable TOML file")
    })?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("profile file {}", path.display()))?;
    table.entry("share").or_insert(toml::Value::Float(1.0));
    table
        .entry("name")
        .or_insert(toml::Value::String("custom".into()));
    let tier: TierSpec = table
        .try_into()
        .with_context(|| format!("profile file {}", path.display()))?;
    Ok(tier.profile()?)
}

/// `flotilla join`.
pub fn join(a: JoinArgs) -> Result<()> {
    let partition = a.partition.as_deref().map(parse_partition).transpose()?;
    let profile = parse_profile(a.profile.as_deref())?;
    let token = match (&a.token, &a.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => {
            // The same format the server reads: the token bound to this client's id (its
            // partition index), else the first line's.
            let grants = flotilla_net::load_tokens(f)?;
            let own = partition.and_then(|(k, _)| grants.iter().find(|g| g.allows(k)));
            Some(own.unwrap_or(&grants[0]).token.clone())
        }
        (None, None) => None,
    };
    let https = a.server.starts_with("https://");
    let tls = match (&a.ca, https) {
        (Some(ca), true) => Some(ClientTls {
            ca: ca.clone(),
            identity: a.cert.clone().zip(a.key.clone()),
            domain: a.domain.clone(),
        }),
        (None, true) => {
            bail!("an https:// server needs --ca with the CA certificate that signed it")
        }
        (_, false) => None,
    };
    let name = a.name.clone().unwrap_or_else(|| match partition {
        Some((k, _)) => format!("partition-{k}"),
        None => "client".into(),
    });
    let data_dir = a.data_dir.clone();
    let setup = Box::new(move |exp: &flotilla_engine::Experiment| {
        let (_, half) = flotilla_methods::build(exp)?;
        let data = load_data(exp, data_dir.as_deref())
            .map_err(|e| flotilla_engine::EngineError::Config(format!("{e:#}")))?;
        let client_data = match partition {
            Some((k, n)) => {
                if n != exp.data.num_clients as u64 {
                    return Err(flotilla_engine::EngineError::Config(format!(
                        "--partition {k}/{n}: this run partitions the data into {} clients (data.num_clients)",
                        exp.data.num_clients
                    )));
                }
                let (fleet, _) = LocalFleet::new(exp, data, half.clone(), 1)?;
                fleet.client_data(k)?
            }
            None => {
                let (mean, std) = exp.data.dataset.normalization();
                let train = data.train;
                let holdout = train.take_first(0);
                ClientData {
                    train,
                    holdout,
                    mean,
                    std,
                }
            }
        };
        tracing::info!(examples = client_data.train.len(), "local data ready");
        Ok((half, client_data))
    });
    let report = client::run(
        JoinOptions {
            server: a.server.clone(),
            token,
            tls,
            client_id: partition.map(|(k, _)| k),
            profile,
            name,
            give_up_s: a.give_up,
            threads: a.threads,
        },
        setup,
    )?;
    println!(
        "client {}: {} updates accepted, {} refused, joined {} time(s)",
        report.client, report.accepted, report.refused, report.joins
    );
    Ok(())
}

/// `flotilla certs`.
pub fn certs(out: &Path, hosts: &[String], tokens: usize) -> Result<()> {
    let f = flotilla_net::certs::generate(out, hosts, tokens)?;
    println!("CA certificate:     {}", f.ca.display());
    println!(
        "server cert/key:    {} {}",
        f.server_cert.display(),
        f.server_key.display()
    );
    println!(
        "client cert/key:    {} {}",
        f.client_cert.display(),
        f.client_key.display()
    );
    println!("bearer tokens:      {}", f.tokens.display());
    println!(
        "serve: flotilla serve --config F --cert {} --key {} --tokens {}",
        f.server_cert.display(),
        f.server_key.display(),
        f.tokens.display()
    );
    println!(
        "join:  flotilla join --server https://HOST:50051 --ca {} --token TOKEN",
        f.ca.display()
    );
    Ok(())
}
