//! A codec for the agent side of `Collector.Stream` that sends messages the agent has
//! already encoded.
//!
//! The agent's spool keeps every `Envelope` as its protobuf bytes; wrapping those bytes in
//! an `AgentMessage` is a two-byte prefix, where decoding and re-encoding through prost
//! would cost a copy of every string. The collector side uses the generated code.

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

use crate::v1::{AgentMessage, CollectorMessage, agent_message};

/// The gRPC path of `sensor.v1.Collector/Stream`.
pub const STREAM_PATH: &str = "/sensor.v1.Collector/Stream";

/// `AgentMessage` field number of `envelope`.
const ENVELOPE_FIELD: u32 = 2;

/// An encoded `AgentMessage`.
#[derive(Clone, Debug)]
pub struct Frame(pub Bytes);

impl Frame {
    /// `AgentMessage { envelope }` from an encoded `Envelope`.
    pub fn envelope(encoded: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(encoded.len() + 11);
        prost::encoding::encode_key(
            ENVELOPE_FIELD,
            prost::encoding::WireType::LengthDelimited,
            &mut buf,
        );
        prost::encoding::encode_varint(encoded.len() as u64, &mut buf);
        buf.extend_from_slice(encoded);
        Self(buf.into())
    }

    pub fn message(msg: agent_message::Msg) -> Self {
        Self(AgentMessage { msg: Some(msg) }.encode_to_vec().into())
    }
}

/// Sends [`Frame`]s, receives `CollectorMessage`s.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameCodec;

pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }
}

pub struct CollectorDecoder;

impl Decoder for CollectorDecoder {
    type Item = CollectorMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CollectorMessage>, Status> {
        CollectorMessage::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable collector message: {e}")))
    }
}

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = CollectorMessage;
    type Encoder = FrameEncoder;
    type Decoder = CollectorDecoder;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> CollectorDecoder {
        CollectorDecoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Envelope, SeqRange, Shed, envelope};

    #[test]
    fn a_wrapped_envelope_is_the_agent_message_prost_would_encode() {
        let env = Envelope {
            seq: 300,
            body: Some(envelope::Body::Shed(Shed {
                dropped: vec![SeqRange { first: 1, last: 3 }],
                events: 3,
                alerts: 0,
                reason: "x".repeat(200),
                unused: Vec::new(),
            })),
        };
        let frame = Frame::envelope(&env.encode_to_vec());
        let expected = AgentMessage {
            msg: Some(agent_message::Msg::Envelope(env.clone())),
        };
        assert_eq!(&frame.0[..], &expected.encode_to_vec()[..]);
        assert_eq!(AgentMessage::decode(frame.0).unwrap(), expected);
    }
}
