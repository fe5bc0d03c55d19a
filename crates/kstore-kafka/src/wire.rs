//! One connection to a Kafka broker, speaking the protocol's framing (a 4-byte size, then a
//! request header and body as the `kafka-protocol` crate encodes them), for the few calls
//! that librdkafka does not offer. Blocking, with a timeout on every read and write.
//!
//! The connection is generic over its stream, so a caller that needs TLS or SASL sets the
//! stream up itself and hands it over.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// The largest answer accepted from a broker.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The address could not be resolved or connected to.
    #[error("connecting to {address}: {reason}")]
    Connect {
        /// The broker's `host:port`.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// Reading or writing the stream failed (a timeout included).
    #[error("{doing}: {source}")]
    Io {
        /// What the connection was doing.
        doing: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The broker's bytes were not a well-formed answer to the request.
    #[error("a malformed answer: {0}")]
    Malformed(String),
}

/// A connection to one broker.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    next_correlation_id: i32,
}

impl Connection<TcpStream> {
    /// Connects over plain TCP to `address` (`host:port`), with `timeout` for the connect
    /// and for every later read and write.
    pub fn open(address: &str, timeout: Duration) -> Result<Self, WireError> {
        Ok(Connection::new(tcp_stream(address, timeout)?))
    }
}

/// Returns a TCP stream connected to `address` (`host:port`), with `timeout` for the connect
/// and set on every later read and write.
pub fn tcp_stream(address: &str, timeout: Duration) -> Result<TcpStream, WireError> {
    let failed = |reason: String| WireError::Connect {
        address: address.into(),
        reason,
    };
    let resolved = address
        .to_socket_addrs()
        .map_err(|error| failed(error.to_string()))?
        .next()
        .ok_or_else(|| failed("the address resolves to nothing".into()))?;
    let stream = TcpStream::connect_timeout(&resolved, timeout)
        .map_err(|error| failed(error.to_string()))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| failed(error.to_string()))?;
    Ok(stream)
}

impl<S: Read + Write> Connection<S> {
    /// Wraps a stream that is already connected (and, where needed, encrypted).
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            next_correlation_id: 1,
        }
    }

    /// Sends `request` as API `key` at `version` and reads its answer.
    pub fn call<Req, Resp>(
        &mut self,
        key: ApiKey,
        request: Req,
        version: i16,
    ) -> Result<Resp, WireError>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("kstore")));
        let encoding = |error: anyhow::Error| WireError::Malformed(format!("encoding: {error}"));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, Req::header_version(version))
            .map_err(encoding)?;
        request.encode(&mut body, version).map_err(encoding)?;
        let size = i32::try_from(body.len())
            .map_err(|_| WireError::Malformed(format!("a request of {} bytes", body.len())))?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(size);
        frame.put_slice(&body);
        self.stream
            .write_all(&frame)
            .and_then(|()| self.stream.flush())
            .map_err(|source| WireError::Io {
                doing: "sending a request",
                source,
            })?;

        let mut answer = Bytes::from(self.read_frame()?);
        let decoding = |error: anyhow::Error| WireError::Malformed(error.to_string());
        let header =
            ResponseHeader::decode(&mut answer, Resp::header_version(version)).map_err(decoding)?;
        if header.correlation_id != correlation_id {
            return Err(WireError::Malformed(format!(
                "an answer to request {} where {correlation_id} was expected",
                header.correlation_id
            )));
        }
        Resp::decode(&mut answer, version).map_err(decoding)
    }

    fn read_frame(&mut self) -> Result<Vec<u8>, WireError> {
        let mut size = [0u8; 4];
        self.stream
            .read_exact(&mut size)
            .map_err(|source| WireError::Io {
                doing: "reading an answer",
                source,
            })?;
        let size = i32::from_be_bytes(size);
        let size = usize::try_from(size)
            .ok()
            .filter(|&size| size <= MAX_RESPONSE_BYTES)
            .ok_or_else(|| WireError::Malformed(format!("an answer of {size} bytes")))?;
        let mut answer = vec![0u8; size];
        self.stream
            .read_exact(&mut answer)
            .map_err(|source| WireError::Io {
                doing: "reading an answer",
                source,
            })?;
        Ok(answer)
    }
}
