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
#![warn(missing_docs)]

pub mod certs;
pub mod client;
mod delivery;
pub mod listener;
pub mod proto;
pub mod push_gate;
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

/// A bearer token the server accepts and the client ids it authorises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Label in logs (e.g. `client-3`); may be empty.
    pub label: String,
    /// The secret.
    pub token: String,
    /// Inclusive id ranges the token may join as; `None`: any id (a fleet-wide token).
    pub clients: Option<Vec<(u64, u64)>>,
}

impl Grant {
    /// Whether this token may act as client `id`.
    pub fn allows(&self, id: u64) -> bool {
        self.clients
            .as_ref()
            .is_none_or(|r| r.iter().any(|(a, b)| (*a..=*b).contains(&id)))
    }

    /// The smallest id this token may act as that `taken` does not hold, below `limit`.
    pub fn first_free(&self, limit: u64, taken: impl Fn(u64) -> bool) -> Option<u64> {
        match &self.clients {
            None => (0..limit).find(|c| !taken(*c)),
            Some(ranges) => ranges
                .iter()
                .flat_map(|(a, b)| *a..=(*b).min(limit.saturating_sub(1)))
                .find(|c| !taken(*c)),
        }
    }
}

/// Parses client ids as written in a token file: `3`, `0-9`, `1,4,10-19`, or `*` (any).
pub fn parse_client_ids(text: &str) -> Result<Option<Vec<(u64, u64)>>, String> {
    if text == "*" {
        return Ok(None);
    }
    let mut out = Vec::new();
    for part in text.split(',') {
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{s}` is not a client id"))
        };
        let range = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if range.0 > range.1 {
            return Err(format!("`{part}` is an empty range"));
        }
        out.push(range);
    }
    Ok(Some(out))
}

/// Reads the bearer tokens a server accepts, one per line, `#` starts a comment:
/// `LABEL TOKEN IDS` binds the token to client ids (`3`, `0-9`, `1,4,10-19`, or `*` for
/// any; `flotilla certs` writes one token per client id), `LABEL TOKEN` and a bare `TOKEN`
/// are fleet-wide tokens that may join as any id (logged as a warning when serving).
pub fn load_tokens(path: &std::path::Path) -> Result<Vec<Grant>, NetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::Setup(format!("token file {}: {e}", path.display())))?;
    let mut grants = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: String| {
            NetError::Setup(format!(
                "token file {} line {}: {why}",
                path.display(),
                i + 1
            ))
        };
        let grant = match fields[..] {
            [] => continue,
            [token] => Grant {
                label: String::new(),
                token: token.into(),
                clients: None,
            },
            [label, token] => Grant {
                label: label.into(),
                token: token.into(),
                clients: None,
            },
            [label, token, ids] => Grant {
                label: label.into(),
                token: token.into(),
                clients: parse_client_ids(ids).map_err(bad)?,
            },
            _ => {
                return Err(bad(
                    "expected `LABEL TOKEN IDS`, `LABEL TOKEN` or `TOKEN`".into()
                ));
            }
        };
        grants.push(grant);
    }
    if grants.is_empty() {
        return Err(NetError::Setup(format!(
            "token file {} holds no token; write one token per line (`flotilla certs` makes some)",
            path.display()
        )));
    }
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_bind_tokens_to_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.txt");
        std::fs::write(
            &path,
            "# comment\nclient-0 aaa 0\nops bbb 2-4,9\nfleet ccc *\nddd\nold eee\n",
        )
        .unwrap();
        let g = load_tokens(&path).unwrap();
        assert_eq!(g.len(), 5);
        assert!(g[0].allows(0) && !g[0].allows(1));
        assert!(g[1].allows(3) && g[1].allows(9) && !g[1].allows(5));
        assert_eq!(g[1].first_free(10, |c| c == 2), Some(3));
        assert_eq!(g[1].first_free(3, |c| c == 2), None);
        assert!(g[2].allows(12345) && g[3].allows(7) && g[4].allows(7));
        std::fs::write(&path, "x tok 5-2\n").unwrap();
        assert!(
            load_tokens(&path)
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        std::fs::write(&path, "x tok 1 extra\n").unwrap();
        assert!(load_tokens(&path).is_err());
    }
}
