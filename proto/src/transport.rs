//! The agent's connection to the controller: plain TCP with
//! `TCP_USER_TIMEOUT`, under tonic's TLS.
//!
//! An agent sends a heartbeat every few seconds, so there is always data in
//! flight that the controller's kernel must acknowledge. With
//! `TCP_USER_TIMEOUT` the agent's kernel drops the connection once sent data
//! stays unacknowledged for that long: a controller that vanished without a
//! reset (host lost, network cut) is noticed within the timeout, and the
//! agent reconnects. HTTP/2 keep-alive pings would notice it too, but each
//! one is a message the controller must decrypt and answer: 10,000 agents
//! pinging every 30 s cost the controller as much as a sixth of their
//! heartbeats. Kernel acknowledgements cost it nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// A tonic connector (`Endpoint::connect_with_connector`) for `host:port`
/// URIs: TCP with `TCP_NODELAY`, `TCP_USER_TIMEOUT` and kernel TCP
/// keep-alive (probes are answered by the peer's kernel, not its process).
#[derive(Clone, Copy, Debug)]
pub struct Connector {
    /// Sent data unacknowledged this long ends the connection.
    pub user_timeout: Duration,
}

impl Connector {
    pub async fn connect(self, uri: Uri) -> io::Result<TcpStream> {
        let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("`{uri}` names no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let sock = socket2::SockRef::from(&stream);
        sock.set_tcp_user_timeout(Some(self.user_timeout))?;
        let idle = (self.user_timeout / 2).max(Duration::from_secs(1));
        sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(5)))?;
        Ok(stream)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let me = *self;
        Box::pin(async move { me.connect(uri).await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_the_user_timeout_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let c = Connector { user_timeout: Duration::from_secs(30) };
        let stream = c.connect(format!("https://127.0.0.1:{port}").parse().expect("uri")).await.expect("connect");
        let sock = socket2::SockRef::from(&stream);
        assert_eq!(sock.tcp_user_timeout().expect("read"), Some(Duration::from_secs(30)));
        assert!(sock.keepalive().expect("read"));
        assert!(stream.nodelay().expect("read"));
        let err = c.connect("/x".parse().expect("uri")).await.expect_err("no host");
        assert!(err.to_string().contains("names no host"), "{err}");
    }
}
