//! Gossip over UDP, and what it drops.
//!
//! The socket is bound before gossip starts, so that a node told to use port 0 can
//! advertise the port it got. Chitchat drops datagrams that do not decode and messages from
//! another cluster (it answers those with "bad cluster", and the sender never joins the
//! view); it only logs them, so [`DropCounter`] counts them from its log events.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chitchat::transport::{Socket, Transport, UdpSocket};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Gossip datagrams that did not decode, so far.
pub static BAD_DATAGRAMS: AtomicU64 = AtomicU64::new(0);
/// Gossip messages from nodes of another cluster, so far.
pub static FOREIGN_CLUSTER_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// A transport that hands chitchat one socket bound beforehand.
pub struct BoundTransport {
    socket: Mutex<Option<UdpSocket>>,
}

impl std::fmt::Debug for BoundTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundTransport").finish_non_exhaustive()
    }
}

impl BoundTransport {
    /// Binds `address` and returns the transport with the address it got.
    pub async fn bind(address: SocketAddr) -> anyhow::Result<(Self, SocketAddr)> {
        let socket = UdpSocket::open(address).await?;
        let bound = socket.local_addr()?;
        let transport = BoundTransport {
            socket: Mutex::new(Some(socket)),
        };
        Ok((transport, bound))
    }
}

#[async_trait::async_trait]
impl Transport for BoundTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow::anyhow!("the gossip socket was opened already"))?;
        Ok(Box::new(socket))
    }
}

/// A tracing layer that counts what chitchat drops, from its warnings: undecodable
/// datagrams ("invalid-chitchat-payload") and SYN messages of another cluster. Install it
/// unfiltered, so that it counts whatever the log level.
#[derive(Debug, Default)]
pub struct DropCounter;

impl<S: Subscriber> Layer<S> for DropCounter {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        if !event.metadata().target().starts_with("chitchat") {
            return;
        }
        let mut message = MessageField(String::new());
        event.record(&mut message);
        if message.0 == "invalid-chitchat-payload" {
            BAD_DATAGRAMS.fetch_add(1, Ordering::Relaxed);
        } else if message
            .0
            .starts_with("received SYN message addressed to a different cluster")
        {
            FOREIGN_CLUSTER_MESSAGES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct MessageField(String);

impl Visit for MessageField {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
