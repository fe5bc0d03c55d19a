//! How the CLI prints a store's values as JSON: as the protobuf type the cluster's Metadata
//! names, described by the node's gRPC reflection (so a type the CLI was not built with
//! prints field by field); the built-in features; else UTF-8 text, else the bytes.

use kstore_proto::v1::CustomerFeatures;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use prost_types::FileDescriptorProto;
use serde_json::Value;
use tonic::transport::Channel;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// The most files a type's description may span (its file and everything it imports).
const MAX_FILES: usize = 256;

/// How values print.
#[derive(Debug, Clone, Default)]
pub struct Values {
    /// The store's value type, as the nodes describe it; `None`: guessed.
    message: Option<MessageDescriptor>,
}

impl Values {
    /// Values guessed from their bytes.
    pub fn guessed() -> Values {
        Values::default()
    }

    /// Values of `type_name`, described by the reflection service on `channel`. The
    /// built-in features and an empty name (raw values) need no description.
    pub async fn described(channel: Channel, type_name: &str) -> Result<Values, String> {
        if type_name.is_empty() || type_name == "kstore.v1.CustomerFeatures" {
            return Ok(Values::guessed());
        }
        let files = fetch_files(channel, type_name).await?;
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_protos(files)
            .map_err(|error| format!("the node's description of {type_name}: {error}"))?;
        let message = pool
            .get_message_by_name(type_name)
            .ok_or_else(|| format!("the node's reflection does not describe {type_name}"))?;
        Ok(Values {
            message: Some(message),
        })
    }

    /// The value as JSON: the store's type field by field, the built-in features as an
    /// object, other values as a UTF-8 string if they are one, else their bytes.
    pub fn json(&self, value: Option<&[u8]>) -> Value {
        let Some(bytes) = value else {
            return Value::Null;
        };
        if let Some(message) = &self.message {
            return match DynamicMessage::decode(message.clone(), bytes) {
                Ok(decoded) => serde_json::to_value(&decoded).unwrap_or(Value::Null),
                Err(error) => serde_json::json!({
                    "undecodable": format!("not a {}: {error}", message.full_name()),
                    "bytes": bytes,
                }),
            };
        }
        if let Ok(features) = CustomerFeatures::decode(bytes)
            && !features.customer_id.is_empty()
        {
            return serde_json::to_value(features).unwrap_or(Value::Null);
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => Value::Array(bytes.iter().map(|b| Value::from(*b)).collect()),
        }
    }
}

/// Asks the reflection service for the file that defines `symbol` and every file it imports.
async fn fetch_files(channel: Channel, symbol: &str) -> Result<Vec<FileDescriptorProto>, String> {
    let mut client = ServerReflectionClient::new(channel);
    let mut files: Vec<FileDescriptorProto> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.to_owned())];
    while let Some(request) = wanted.pop() {
        if files.len() >= MAX_FILES {
            return Err(format!(
                "{symbol}'s description spans over {MAX_FILES} files"
            ));
        }
        let asked = format!("{request:?}");
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .map_err(|status| format!("asking the node's reflection for {symbol}: {status}"))?
            .into_inner();
        let answer = answers
            .message()
            .await
            .map_err(|status| format!("asking the node's reflection for {symbol}: {status}"))?
            .and_then(|answer| answer.message_response)
            .ok_or_else(|| format!("the node's reflection gave no answer to {asked}"))?;
        let encoded = match answer {
            MessageResponse::FileDescriptorResponse(response) => response.file_descriptor_proto,
            MessageResponse::ErrorResponse(error) => {
                return Err(format!(
                    "the node's reflection does not describe {symbol}: {}",
                    error.error_message
                ));
            }
            other => return Err(format!("the node's reflection answered {other:?}")),
        };
        for bytes in encoded {
            let file = FileDescriptorProto::decode(bytes.as_slice())
                .map_err(|error| format!("the node's description of {symbol}: {error}"))?;
            if files.iter().any(|known| known.name == file.name) {
                continue;
            }
            for dependency in &file.dependency {
                let known = files.iter().any(|f| f.name.as_deref() == Some(dependency));
                if !known {
                    wanted.push(MessageRequest::FileByFilename(dependency.clone()));
                }
            }
            files.push(file);
        }
    }
    Ok(files)
}
