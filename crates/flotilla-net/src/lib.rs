//! flotilla over the network: `flotilla serve` runs the round loop of
//! [`flotilla_engine::Driver`] with the clients in other processes, `flotilla join` runs a
//! client process. One protocol for both drivers: tasks and replies are the bytes the
//! simulator measures, carried by the gRPC service `flotilla.v1.Coordinator`
//! (`proto/flotilla.proto`).
//!
//! A client calls `Describe` (learns the experiment, sets up its data), `Join` (gets an id and
//! a session), then long-polls `Pull` for tasks, trains with the method's client half while
//! sending `Heartbeat`s, and `Push`es the reply. Every call carries a bearer token; TLS is on
//! unless the operator passes `--insecure`.

pub mod certs;
pub mod client;
pub mod proto;
pub mod server;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad options or files (certificates, tokens, addresses).
    #[error("{0}")]
    Setup(String),
    /// The peer refused us or speaks another protocol.
    #[error("{0}")]
    Refused(String),
    /// The connection could not be (re-)established in time.
    #[error("{0}")]
    Unreachable(String),
    /// From the engine (method, data, checkpoint).
    #[error(transparent)]
    Engine(#[from] flotilla_engine::EngineError),
}

/// Reads the bearer tokens a server accepts: one per line, `#` starts a comment; a line
/// may be `name token` to label the client in logs.
pub fn load_tokens(path: &std::path::Path) -> Result<Vec<(String, String)>, NetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::Setup(format!("token file {}: {e}", path.display())))?;
    let tokens: Vec<(String, String)> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((name, tok)) => (name.to_string(), tok.trim().to_string()),
            None => (String::new(), l.to_string()),
        })
        .collect();
    if tokens.is_empty() {
        return Err(NetError::Setup(format!(
            "token file {} holds no token; write one token per line (`flotilla certs` makes some)",
            path.display()
        )));
    }
    Ok(tokens)
}
