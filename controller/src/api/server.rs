//! The controller's one listener: TLS 1.3 with client certificates, serving
//! the agent stream and the admin API, and its orderly shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Accepts TCP connections and completes TLS handshakes concurrently (a
/// slow or hostile client cannot stall the accept loop), each bounded by
/// `handshake_timeout`. Refused handshakes (no certificate, another CA,
/// expired) are logged with the peer address; a refused site certificate
/// is also recorded (the server config's observer, `agents::refusals`).
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            // The listener closes as soon as the server stops (a standby's
            // makes way for the leader's on the same address).
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                // The peer's address is known to the refusal observer
                // (`agents::refusals`), which the verifier calls inside
                // the handshake.
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
                match crate::agents::refusals::with_peer(peer, handshake).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // A TCP probe (load balancer, port check) closes without a
                    // handshake: not worth a warning.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "connection closed before a TLS handshake")
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, timeout = ?handshake_timeout, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Binds `addr` with a pending-connection queue of `backlog` (a fleet
/// reconnecting at once after a restart overflows the default 1,024: SYNs
/// are dropped and agents back off for nothing), naming it in the error.
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, std::io::Error> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.map_err(named)?;
    socket.set_reuseaddr(true).map_err(named)?;
    socket.bind(addr).map_err(named)?;
    socket.listen(backlog).map_err(named)
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the controller");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}

/// What a standby answers to every gRPC call, agent streams and admin
/// requests alike: `UNAVAILABLE` ("not the leader"), naming the leader's
/// address in the message and in [`dr_proto::LEADER_METADATA`] when it is
/// known, with when its lease ends ([`dr_proto::RETRY_AFTER_METADATA`]: a
/// client that cannot reach that leader asks again then, not sooner).
/// Nothing is served or changed here: the leader alone drives.
pub async fn serve_standby(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    leader: Arc<std::sync::Mutex<crate::store::lease::LeaderSeen>>,
    poll: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let answer = move || {
        let seen = leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (at, retry_ms) = (seen.address.clone(), (seen.ends_in() + poll).as_millis() as u64);
        async move {
            let mut status = if at.is_empty() {
                tonic::Status::unavailable("this controller is a standby; the leader is not known yet: try again shortly")
            } else {
                tonic::Status::unavailable(format!("this controller is a standby; the leader is at {at}"))
            };
            if let Ok(v) = at.parse() {
                status.metadata_mut().insert(dr_proto::LEADER_METADATA, v);
                status.metadata_mut().insert(dr_proto::RETRY_AFTER_METADATA, retry_ms.into());
            }
            status.into_http::<axum::body::Body>()
        }
    };
    let routes = tonic::service::Routes::from(axum::Router::new().fallback(answer));
    let incoming = tls_incoming(listener, tls, handshake_timeout);
    tonic::transport::Server::builder().add_routes(routes).serve_with_incoming_shutdown(incoming, stop).await
}
