//! ARP for Ethernet/IPv4 (RFC 826).

use super::ethernet::EthernetAddress;
use super::packet::PacketError;
use std::net::Ipv4Addr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;

mod field {
    use std::ops::Range;
    pub const HTYPE: Range<usize> = 0..2;
    pub const PTYPE: Range<usize> = 2..4;
    pub const HLEN: usize = 4;
    pub const PLEN: usize = 5;
    pub const OPER: Range<usize> = 6..8;
    pub const SHA: Range<usize> = 8..14;
    pub const SPA: Range<usize> = 14..18;
    pub const THA: Range<usize> = 18..24;
    pub const TPA: Range<usize> = 24..28;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOperation {
    Request,
    Reply,
    Unknown(u16),
}

impl From<u16> for ArpOperation {
    fn from(v: u16) -> Self {
        match v {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            other => ArpOperation::Unknown(other),
        }
    }
}

impl From<ArpOperation> for u16 {
    fn from(v: ArpOperation) -> u16 {
        match v {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
            ArpOperation::Unknown(other) => other,
        }
    }
}

/// A view of an ARP packet. `new_checked` only accepts Ethernet/IPv4 ARP.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        let packet = Packet { buffer };
        let b = packet.buffer.as_ref();
        if b.len() < PACKET_LEN {
            return Err(PacketError::Truncated);
        }
        Ok(packet)
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    fn u16_at(&self, r: std::ops::Range<usize>) -> u16 {
        match self.bytes().get(r) {
            Some(b) => u16::from_be_bytes([b[0], b[1]]),
            None => 0,
        }
    }
    fn mac_at(&self, r: std::ops::Range<usize>) -> EthernetAddress {
        let mut mac = [0u8; 6];
        if let Some(b) = self.bytes().get(r) {
            mac.copy_from_slice(b);
        }
        EthernetAddress(mac)
    }
    fn ip_at(&self, r: std::ops::Range<usize>) -> Ipv4Addr {
        match self.bytes().get(r) {
            Some(b) => Ipv4Addr::new(b[0], b[1], b[2], b[3]),
            None => Ipv4Addr::UNSPECIFIED,
        }
    }

    pub fn hardware_type(&self) -> u16 {
        self.u16_at(field::HTYPE)
    }
    pub fn protocol_type(&self) -> u16 {
        self.u16_at(field::PTYPE)
    }
    pub fn hardware_len(&self) -> u8 {
        self.bytes().get(field::HLEN).copied().unwrap_or(0)
    }
    pub fn protocol_len(&self) -> u8 {
        self.bytes().get(field::PLEN).copied().unwrap_or(0)
    }
    pub fn operation(&self) -> ArpOperation {
        ArpOperation::from(self.u16_at(field::OPER))
    }
    pub fn sender_hardware_addr(&self) -> EthernetAddress {
        self.mac_at(field::SHA)
    }
    pub fn sender_protocol_addr(&self) -> Ipv4Addr {
        self.ip_at(field::SPA)
    }
    pub fn target_hardware_addr(&self) -> EthernetAddress {
        self.mac_at(field::THA)
    }
    pub fn target_protocol_addr(&self) -> Ipv4Addr {
        self.ip_at(field::TPA)
    }
}

/// A parsed Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpRepr {
    pub operation: ArpOperation,
    pub source_hardware_addr: EthernetAddress,
    pub source_protocol_addr: Ipv4Addr,
    pub target_hardware_addr: EthernetAddress,
    pub target_protocol_addr: Ipv4Addr,
}

impl ArpRepr {
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, PacketError> {
        if packet.hardware_type() != 1
            || packet.protocol_type() != 0x0800
            || packet.hardware_len() != 6
            || packet.protocol_len() != 4
        {
            return Err(PacketError::Unsupported);
        }
        Ok(ArpRepr {
            operation: packet.operation(),
            source_hardware_addr: packet.sender_hardware_addr(),
            source_protocol_addr: packet.sender_protocol_addr(),
            target_hardware_addr: packet.target_hardware_addr(),
            target_protocol_addr: packet.target_protocol_addr(),
        })
    }

    pub const fn buffer_len(&self) -> usize {
        PACKET_LEN
    }

    pub fn emit(&self, buf: &mut [u8]) -> Result<(), PacketError> {
        let b = buf
            .get_mut(..PACKET_LEN)
            .ok_or(PacketError::BufferTooSmall)?;
        b[field::HTYPE].copy_from_slice(&1u16.to_be_bytes());
        b[field::PTYPE].copy_from_slice(&0x0800u16.to_be_bytes());
        b[field::HLEN] = 6;
        b[field::PLEN] = 4;
        b[field::OPER].copy_from_slice(&u16::from(self.operation).to_be_bytes());
        b[field::SHA].copy_from_slice(&self.source_hardware_addr.0);
        b[field::SPA].copy_from_slice(&self.source_protocol_addr.octets());
        b[field::THA].copy_from_slice(&self.target_hardware_addr.0);
        b[field::TPA].copy_from_slice(&self.target_protocol_addr.octets());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_non_ipv4_arp() {
        let mut buf = [0u8; PACKET_LEN];
        let repr = ArpRepr {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress([1; 6]),
            source_protocol_addr: Ipv4Addr::new(10, 0, 0, 1),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: Ipv4Addr::new(10, 0, 0, 2),
        };
        repr.emit(&mut buf).unwrap();
        buf[2] = 0x86; // ptype 0x86dd
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(ArpRepr::parse(&p), Err(PacketError::Unsupported));
        assert_eq!(
            Packet::new_checked(&buf[..27]).unwrap_err(),
            PacketError::Truncated
        );
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(op in 1u16..=2, sha in any::<[u8; 6]>(), spa in any::<u32>(),
                                 tha in any::<[u8; 6]>(), tpa in any::<u32>()) {
            let repr = ArpRepr {
                operation: ArpOperation::from(op),
                source_hardware_addr: EthernetAddress(sha),
                source_protocol_addr: Ipv4Addr::from(spa),
                target_hardware_addr: EthernetAddress(tha),
                target_protocol_addr: Ipv4Addr::from(tpa),
            };
            let mut buf = [0u8; PACKET_LEN];
            repr.emit(&mut buf).unwrap();
            let p = Packet::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(ArpRepr::parse(&p).unwrap(), repr);
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = ArpRepr::parse(&p);
            }
        }
    }
}
