//! ICMPv4 (RFC 792): echo request and reply; other messages are parsed only
//! far enough to be counted and ignored.

use super::packet::{checksum, Checksum, PacketError};

pub const HEADER_LEN: usize = 8;

pub mod message {
    pub const ECHO_REPLY: u8 = 0;
    pub const DST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
}

/// A view of an ICMPv4 message.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(PacketError::Truncated);
        }
        Ok(Packet { buffer })
    }
    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    fn u16_at(&self, at: usize) -> u16 {
        match self.bytes().get(at..at + 2) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 0,
        }
    }
    pub fn msg_type(&self) -> u8 {
        self.bytes().first().copied().unwrap_or(0)
    }
    pub fn msg_code(&self) -> u8 {
        self.bytes().get(1).copied().unwrap_or(0)
    }
    pub fn checksum(&self) -> u16 {
        self.u16_at(2)
    }
    pub fn echo_ident(&self) -> u16 {
        self.u16_at(4)
    }
    pub fn echo_seq_no(&self) -> u16 {
        self.u16_at(6)
    }
    pub fn data(&self) -> &[u8] {
        self.bytes().get(HEADER_LEN..).unwrap_or(&[])
    }
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.bytes())) == 0xffff
    }
}

/// A parsed echo message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmpv4Repr<'a> {
    EchoRequest {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
    EchoReply {
        ident: u16,
        seq_no: u16,
        data: &'a [u8],
    },
}

impl<'a> Icmpv4Repr<'a> {
    /// Parses an echo request/reply; other messages are `Unsupported`.
    pub fn parse(packet: &Packet<&'a [u8]>, checksum: Checksum) -> Result<Self, PacketError> {
        if checksum.verify_rx() && !packet.verify_checksum() {
            return Err(PacketError::Checksum);
        }
        let data: &'a [u8] = packet.buffer.get(HEADER_LEN..).unwrap_or(&[]);
        match (packet.msg_type(), packet.msg_code()) {
            (message::ECHO_REQUEST, 0) => Ok(Icmpv4Repr::EchoRequest {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            }),
            (message::ECHO_REPLY, 0) => Ok(Icmpv4Repr::EchoReply {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            }),
            _ => Err(PacketError::Unsupported),
        }
    }

    pub fn buffer_len(&self) -> usize {
        match self {
            Icmpv4Repr::EchoRequest { data, .. } | Icmpv4Repr::EchoReply { data, .. } => {
                HEADER_LEN + data.len()
            }
        }
    }

    /// Writes the message into `buf[..buffer_len()]`, checksum included
    /// (ICMP checksums are never offloaded).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), PacketError> {
        let len = self.buffer_len();
        let b = buf.get_mut(..len).ok_or(PacketError::BufferTooSmall)?;
        let (msg_type, ident, seq_no, data) = match *self {
            Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } => (message::ECHO_REQUEST, ident, seq_no, data),
            Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            } => (message::ECHO_REPLY, ident, seq_no, data),
        };
        b[0] = msg_type;
        b[1] = 0;
        b[2..4].copy_from_slice(&[0, 0]);
        b[4..6].copy_from_slice(&ident.to_be_bytes());
        b[6..8].copy_from_slice(&seq_no.to_be_bytes());
        b[HEADER_LEN..].copy_from_slice(data);
        let sum = checksum::finish(checksum::sum(b));
        b[2..4].copy_from_slice(&sum.to_be_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_checksum_and_other_types() {
        let repr = Icmpv4Repr::EchoRequest {
            ident: 1,
            seq_no: 2,
            data: b"ping",
        };
        let mut buf = [0u8; 12];
        repr.emit(&mut buf).unwrap();
        buf[11] ^= 1;
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&p, Checksum::Both),
            Err(PacketError::Checksum)
        );
        buf[0] = message::DST_UNREACHABLE;
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&p, Checksum::None),
            Err(PacketError::Unsupported)
        );
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(reply in any::<bool>(), ident in any::<u16>(), seq_no in any::<u16>(),
                                 data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let repr = if reply {
                Icmpv4Repr::EchoReply { ident, seq_no, data: &data }
            } else {
                Icmpv4Repr::EchoRequest { ident, seq_no, data: &data }
            };
            let mut buf = vec![0u8; repr.buffer_len()];
            repr.emit(&mut buf).unwrap();
            let p = Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(Icmpv4Repr::parse(&p, Checksum::Both).unwrap(), repr);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = Icmpv4Repr::parse(&p, Checksum::Both);
            }
        }
    }
}
