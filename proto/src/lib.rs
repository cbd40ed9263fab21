//! The `sensor.v1` schema: what an event, an alert and the agent-to-collector stream are.
//!
//! The `.proto` files under `proto/sensor/v1` are the single, documented definition; this
//! crate only includes the code generated from them (prost messages, tonic service, and the
//! protobuf JSON mapping through pbjson, which the agent's JSON lines use).

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/sensor.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/sensor.v1.serde.rs"));
}

pub mod frames;
pub mod kind;
pub mod metrics_http;
pub mod pem;
pub mod position;

pub use kind::EventKind;
pub use pbjson_types::Timestamp;
