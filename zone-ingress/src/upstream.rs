//! Connecting to a route's endpoints: round robin, a timeout per attempt, failover to the next.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::datapath::local::{LocalRedirect, Registration};
use crate::routes::Route;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("route {sni} has no endpoints")]
    NoEndpoints { sni: String },
    #[error("no endpoint of route {sni} could be reached: {}", describe(.attempts))]
    AllFailed {
        sni: String,
        attempts: Vec<(SocketAddr, String)>,
    },
    /// The agent itself could not make the socket (no file descriptor or memory left). Not the
    /// endpoint's fault: no endpoint is counted as failed, and no other is tried since each would
    /// fail the same way.
    #[error(
        "cannot open a socket to {endpoint} for route {sni}: {error}; the agent is out of file descriptors or memory (check `ulimit -n`)"
    )]
    LocalResources {
        sni: String,
        endpoint: SocketAddr,
        error: std::io::Error,
    },
}

impl ConnectError {
    /// True when the agent, not the route's endpoints, is the problem.
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::LocalResources { .. })
    }
}

fn describe(attempts: &[(SocketAddr, String)]) -> String {
    attempts
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A connected upstream socket.
pub struct Connected {
    pub stream: TcpStream,
    pub endpoint: SocketAddr,
    /// Set when the endpoint is on this host and the connection was registered for the local
    /// redirect (see `datapath::local`).
    pub local: Option<Registration>,
}

/// Connects to the route's next endpoint, trying each of the others once on failure. With
/// `local` (the local redirect and the client socket's cookie), an endpoint on this host is
/// connected through [`LocalRedirect::connect`].
pub async fn connect(
    route: &Route,
    timeout: Duration,
    stats: &Stats,
    local: Option<(&LocalRedirect, u64)>,
) -> Result<Connected, ConnectError> {
    let mut attempts = Vec::new();
    for endpoint in route.endpoints_round_robin() {
        let attempt = async {
            if let Some((redirect, down_cookie)) = local
                && let Some((stream, reg)) = redirect.connect(endpoint, down_cookie).await?
            {
                return Ok((stream, Some(reg)));
            }
            Ok::<_, std::io::Error>((TcpStream::connect(endpoint).await?, None))
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) if crate::listener::is_resource_exhaustion(&e) => {
                return Err(ConnectError::LocalResources {
                    sni: route.sni.to_string(),
                    endpoint,
                    error: e,
                });
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("connect timed out after {timeout:?}")),
        };
        match result {
            Ok((stream, local)) => {
                // Small TLS records (handshake, RPCs) must not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%endpoint, error = %e, "TCP_NODELAY on upstream failed");
                }
                return Ok(Connected {
                    stream,
                    endpoint,
                    local,
                });
            }
            Err(reason) => {
                stats.upstream_connect_failed(&route.cluster);
                tracing::debug!(sni = %route.sni, %endpoint, %reason, "endpoint connect failed, trying the next");
                attempts.push((endpoint, reason));
            }
        }
    }
    if attempts.is_empty() {
        return Err(ConnectError::NoEndpoints {
            sni: route.sni.to_string(),
        });
    }
    Err(ConnectError::AllFailed {
        sni: route.sni.to_string(),
        attempts,
    })
}
