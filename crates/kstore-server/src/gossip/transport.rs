//! Gossip over UDP, authenticated, and what it drops.
//!
//! The socket is bound before gossip starts, so that a node told to use port 0 can
//! advertise the port it got. With the cluster's secret, every datagram ends with an
//! HMAC-SHA256 of the rest under that secret; a datagram without the right one is dropped
//! before chitchat sees it, and counted, so a host that does not know the secret can
//! neither join the view nor announce copies nor change another node's state. Chitchat
//! encodes its messages itself (its encoding is not public), so the MAC is added and checked
//! by a relay: chitchat's socket is bound on loopback, and sends to and receives from one
//! loopback relay socket per peer, which carries the datagrams to and from the peer over
//! the public socket, adding or checking the MAC. Chitchat drops datagrams that do not
//! decode and messages from another cluster (it answers those with "bad cluster", and the
//! sender never joins the view); it only logs them, so [`DropCounter`] counts them from its
//! log events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Gossip datagrams that did not decode, so far.
pub static BAD_DATAGRAMS: AtomicU64 = AtomicU64::new(0);
/// Gossip messages from nodes of another cluster, so far.
pub static FOREIGN_CLUSTER_MESSAGES: AtomicU64 = AtomicU64::new(0);
/// Gossip datagrams without the MAC of the cluster's secret, so far.
pub static UNAUTHENTICATED_DATAGRAMS: AtomicU64 = AtomicU64::new(0);

/// The largest UDP payload (IPv4).
const MAX_DATAGRAM: usize = 65_507;
/// The length of a datagram's MAC.
const TAG_BYTES: usize = 32;
/// The most peers a node relays for (a cluster has far fewer; only authenticated peers and
/// the addresses chitchat sends to get a relay).
const MAX_PEERS: usize = 1_024;

/// A transport that hands chitchat one socket bound beforehand.
pub struct BoundTransport {
    socket: Mutex<Option<Bound>>,
}

/// The socket bound beforehand.
enum Bound {
    /// Plain gossip: chitchat's own socket on the public address.
    Plain(UdpSocket),
    /// Authenticated gossip: the public socket and the secret.
    Authenticated {
        public: Arc<tokio::net::UdpSocket>,
        key: Arc<[u8]>,
    },
}

impl std::fmt::Debug for BoundTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundTransport").finish_non_exhaustive()
    }
}

impl BoundTransport {
    /// Binds `address` and returns the transport with the address it got. With `secret`,
    /// datagrams are authenticated with it.
    pub async fn bind(
        address: SocketAddr,
        secret: Option<&str>,
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let (bound, address) = match secret {
            None => {
                let socket = UdpSocket::open(address).await?;
                let bound = socket.local_addr()?;
                (Bound::Plain(socket), bound)
            }
            Some(secret) => {
                let public = tokio::net::UdpSocket::bind(address).await?;
                let bound = public.local_addr()?;
                let key: Arc<[u8]> = Arc::from(secret.as_bytes());
                (
                    Bound::Authenticated {
                        public: Arc::new(public),
                        key,
                    },
                    bound,
                )
            }
        };
        let transport = BoundTransport {
            socket: Mutex::new(Some(bound)),
        };
        Ok((transport, address))
    }
}

#[async_trait::async_trait]
impl Transport for BoundTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let bound = self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow::anyhow!("the gossip socket was opened already"))?;
        match bound {
            Bound::Plain(socket) => Ok(Box::new(socket)),
            Bound::Authenticated { public, key } => {
                let inner = UdpSocket::open(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
                let relays = Arc::new(Relays {
                    public: public.clone(),
                    key,
                    inner: inner.local_addr()?,
                    peers: Mutex::new(Peers::default()),
                });
                tokio::spawn(receive_public(relays.clone()));
                Ok(Box::new(AuthenticatedSocket { inner, relays }))
            }
        }
    }
}

/// The MAC of `payload` under `key`.
fn tag(key: &[u8], payload: &[u8]) -> [u8; TAG_BYTES] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(payload);
    mac.finalize().into_bytes().into()
}

/// The payload of an authenticated datagram, or `None` if its MAC is not `key`'s (checked
/// in constant time).
fn verified<'a>(key: &[u8], datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(TAG_BYTES)?;
    let (payload, presented) = datagram.split_at(split);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(payload);
    mac.verify_slice(presented).ok().map(|()| payload)
}

/// The relays between chitchat's loopback socket and the peers.
struct Relays {
    /// The node's public gossip socket.
    public: Arc<tokio::net::UdpSocket>,
    key: Arc<[u8]>,
    /// Chitchat's loopback socket.
    inner: SocketAddr,
    peers: Mutex<Peers>,
}

/// Each peer's relay socket, both ways.
#[derive(Default)]
struct Peers {
    relay_of: HashMap<SocketAddr, (SocketAddr, Arc<tokio::net::UdpSocket>)>,
    peer_of: HashMap<SocketAddr, SocketAddr>,
}

impl Relays {
    /// Returns the relay socket of `peer`, opening it (and its task, which carries what
    /// chitchat sends to it out to the peer) the first time.
    async fn relay(
        self: &Arc<Self>,
        peer: SocketAddr,
    ) -> anyhow::Result<(SocketAddr, Arc<tokio::net::UdpSocket>)> {
        if let Some(relay) = self.lock().relay_of.get(&peer) {
            return Ok(relay.clone());
        }
        let socket =
            Arc::new(tokio::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        let address = socket.local_addr()?;
        {
            let mut peers = self.lock();
            if let Some(relay) = peers.relay_of.get(&peer) {
                return Ok(relay.clone());
            }
            if peers.relay_of.len() >= MAX_PEERS {
                anyhow::bail!("gossip relays for {MAX_PEERS} peers already");
            }
            peers.relay_of.insert(peer, (address, socket.clone()));
            peers.peer_of.insert(address, peer);
        }
        tokio::spawn(send_to_peer(self.clone(), socket.clone(), peer));
        Ok((address, socket))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Carries what chitchat sends to `relay` out to `peer`, with its MAC.
async fn send_to_peer(relays: Arc<Relays>, relay: Arc<tokio::net::UdpSocket>, peer: SocketAddr) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((received, from)) = relay.recv_from(&mut buffer).await else {
            continue;
        };
        if from != relays.inner {
            continue;
        }
        if received + TAG_BYTES > MAX_DATAGRAM {
            tracing::warn!(bytes = received, %peer, "a gossip datagram is too large to carry its MAC");
            continue;
        }
        let tag = tag(&relays.key, &buffer[..received]);
        buffer[received..received + TAG_BYTES].copy_from_slice(&tag);
        if let Err(error) = relays
            .public
            .send_to(&buffer[..received + TAG_BYTES], peer)
            .await
        {
            tracing::debug!(%error, %peer, "sending gossip");
        }
    }
}

/// Checks what arrives on the public socket, and hands what carries the cluster's MAC to
/// chitchat through the sender's relay.
async fn receive_public(relays: Arc<Relays>) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (received, from) = match relays.public.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "receiving gossip");
                continue;
            }
        };
        let Some(payload) = verified(&relays.key, &buffer[..received]) else {
            UNAUTHENTICATED_DATAGRAMS.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match relays.relay(from).await {
            Ok((_, relay)) => {
                let _ = relay.send_to(payload, relays.inner).await;
            }
            Err(error) => tracing::warn!(%error, %from, "dropping gossip"),
        }
    }
}

/// Chitchat's view of the authenticated transport: its own socket, whose peers are
/// relays.
struct AuthenticatedSocket {
    inner: UdpSocket,
    relays: Arc<Relays>,
}

#[async_trait::async_trait]
impl Socket for AuthenticatedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.relays.public.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        match self.relays.relay(to).await {
            Ok((relay, _)) => self.inner.send(relay, envelope).await,
            Err(error) => {
                tracing::warn!(%error, %to, "not sending gossip");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut outcome = self.inner.recv().await?;
            // Only the relays may reach chitchat's socket; anything else is dropped.
            let Some(peer) = self.relays.lock().peer_of.get(&outcome.from_addr).copied() else {
                continue;
            };
            outcome.from_addr = peer;
            return Ok(outcome);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_passes_only_with_the_mac_of_its_own_bytes_and_key() {
        let key = b"0123456789abcdef0123456789abcdef";
        let payload = b"a chitchat envelope";
        let mut datagram = payload.to_vec();
        datagram.extend_from_slice(&tag(key, payload));
        assert_eq!(verified(key, &datagram), Some(&payload[..]));
        // Another key, a changed byte, a cut tag, nothing at all: dropped.
        assert_eq!(
            verified(b"another key of the same length!!", &datagram),
            None
        );
        let mut changed = datagram.clone();
        changed[3] ^= 1;
        assert_eq!(verified(key, &changed), None);
        assert_eq!(verified(key, &datagram[..datagram.len() - 1]), None);
        assert_eq!(verified(key, &[]), None);
        assert_eq!(verified(key, &datagram[..TAG_BYTES]), None);
    }
}
