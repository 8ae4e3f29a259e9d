//! The ledger's file format (version 2): what `ledger.log` holds, as bytes. Pure: the server
//! does the reading, appending and fsyncing (`ca-server/src/authority/ledger.rs`).
//!
//! ```text
//! file  := "MLEDGER2" frame*
//! frame := len:u32 payload[len] sum[8]      sum: the first 8 bytes of SHA-256(len ‖ payload)
//! item  := 'H' complete_since:i64           the first frame's only item
//!        | 'N' kind:u8 index:u32 len:u32 bytes[len]
//!                                           a name the items after it use: kind 'i' a SPIFFE ID,
//!                                           'v' who asked for the workload, 'a' an anchor,
//!                                           's' an issuer; a later 'N' may reuse an index
//!        | 'L' key[16] serial_len:u8 serial[16] id:u32 via:u32 issued:u32 not_after:u32
//!            version:u32 anchor:u16 issuer:u16 api:u8 [len:u32 serial[len] when serial_len
//!            is 255]                        a leaf: 59 bytes
//!        | 'C'                              closed cleanly: nothing may follow
//! ```
//!
//! Integers are little-endian. A leaf's names are resolved when it is read, so an index the
//! writer reuses for another name later cannot change what an earlier leaf said. A frame whose
//! sum is wrong (a torn append) makes the whole file unusable as complete, as a torn JSON line
//! did in version 1.

use std::collections::HashMap;

use time::OffsetDateTime;

use super::{Api, CertId, FREE, Incoming, Key, Ledger, NONE, Name, ODD_SERIAL, Serial};

/// The first bytes of a version-2 file.
pub const MAGIC: &[u8; 8] = b"MLEDGER2";

fn sum(len_and_payload: &[u8]) -> [u8; 8] {
    let d = ring::digest::digest(&ring::digest::SHA256, len_and_payload);
    let mut s = [0u8; 8];
    s.copy_from_slice(&d.as_ref()[..8]);
    s
}

/// Appends `payload` to `out` as one frame.
fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    let start = out.len();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    let s = sum(&out[start..]);
    out.extend_from_slice(&s);
}

/// The frame a clean shutdown appends.
pub fn closed_frame() -> Vec<u8> {
    let mut out = Vec::with_capacity(13);
    frame(&mut out, b"C");
    out
}

fn name_item(p: &mut Vec<u8>, kind: u8, index: u32, s: &str) {
    p.push(b'N');
    p.push(kind);
    p.extend_from_slice(&index.to_le_bytes());
    p.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

impl Ledger {
    /// Appends slot `s`'s leaf to `p`, preceded by any name it uses that this file lacks.
    fn leaf_item(&mut self, p: &mut Vec<u8>, s: u32) {
        let l = self.slots[s as usize];
        if self.ids.needs_writing(l.id) {
            name_item(p, b'i', l.id, self.ids.get(l.id));
        }
        if l.via != NONE && self.vias.needs_writing(l.via) {
            name_item(p, b'v', l.via, self.vias.get(l.via));
        }
        let a = usize::from(l.anchor);
        if self.anchors_written.get(a) == Some(&false) {
            self.anchors_written[a] = true;
            name_item(p, b'a', u32::from(l.anchor), self.anchors[a].as_str());
        }
        let i = usize::from(l.issuer);
        if self.issuers_written.get(i) == Some(&false) {
            self.issuers_written[i] = true;
            name_item(p, b's', u32::from(l.issuer), self.issuers[i].as_str());
        }
        p.push(b'L');
        for w in l.key {
            p.extend_from_slice(&w.to_le_bytes());
        }
        p.push(l.serial_len);
        p.extend_from_slice(&l.serial);
        for n in [l.id, l.via, l.issued, l.not_after, l.version] {
            p.extend_from_slice(&n.to_le_bytes());
        }
        p.extend_from_slice(&l.anchor.to_le_bytes());
        p.extend_from_slice(&l.issuer.to_le_bytes());
        p.push(api_byte(l.api));
        if l.serial_len == ODD_SERIAL {
            let odd = self.odd_serials.get(&s).map_or("", |b| &**b);
            p.extend_from_slice(&u32::try_from(odd.len()).unwrap_or(u32::MAX).to_le_bytes());
            p.extend_from_slice(odd.as_bytes());
        }
    }

    /// Appends to `out` one frame with every leaf changed since the file last had it, and
    /// empties the queue; returns how many leaves it wrote (0: nothing appended).
    pub fn write_queued(&mut self, out: &mut Vec<u8>) -> usize {
        let queued = std::mem::take(&mut self.queued);
        let mut p = Vec::with_capacity(queued.len() * 64);
        let mut n = 0;
        for s in queued {
            let l = &mut self.slots[s as usize];
            if l.id == FREE || !l.queued {
                continue;
            }
            l.queued = false;
            self.leaf_item(&mut p, s);
            n += 1;
        }
        if n > 0 {
            frame(out, &p);
        }
        n
    }

    /// The whole file afresh: the header and every held leaf (the queue is emptied, every name
    /// written again); returns how many leaves.
    pub fn write_all(&mut self, out: &mut Vec<u8>) -> usize {
        self.ids.forget_written();
        self.vias.forget_written();
        self.anchors_written.fill(false);
        self.issuers_written.fill(false);
        for s in std::mem::take(&mut self.queued) {
            self.slots[s as usize].queued = false;
        }
        out.extend_from_slice(MAGIC);
        let mut h = vec![b'H'];
        h.extend_from_slice(&self.complete_since.unix_timestamp().to_le_bytes());
        frame(out, &h);
        let slots: Vec<u32> = self.held().map(|(s, _)| s).collect();
        let mut p = Vec::with_capacity(slots.len() * 64);
        for s in &slots {
            self.leaf_item(&mut p, *s);
        }
        if !slots.is_empty() {
            frame(out, &p);
        }
        slots.len()
    }
}

fn api_byte(a: Api) -> u8 {
    match a {
        Api::Meshca => 0,
        Api::Istio => 1,
        Api::Linkerd => 2,
        Api::Pod => 3,
    }
}

fn api_of(b: u8) -> Option<Api> {
    Api::ALL.get(usize::from(b)).copied()
}

/// A file read back.
#[derive(Debug)]
pub struct ReadLedger {
    /// Its leaves, as a ledger complete since the header says.
    pub ledger: Ledger,
    /// It ends with the closing frame.
    pub closed: bool,
    /// Leaf items read (a superseded leaf counts too).
    pub records: usize,
}

/// Bytes taken off the front of a slice, or why not.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn str(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?).map_err(|_| "a name is not UTF-8".to_owned())
    }
}

/// The file's names as read so far: the ledger's own name indices (held while the file
/// maps to them), anchor and issuer indices.
#[derive(Default)]
struct FileNames {
    ids: HashMap<u32, u32>,
    vias: HashMap<u32, u32>,
    anchors: HashMap<u32, u16>,
    issuers: HashMap<u32, u16>,
}

impl FileNames {
    fn define(&mut self, l: &mut Ledger, c: &mut Cursor<'_>) -> Result<(), String> {
        let kind = c.u8()?;
        let index = c.u32()?;
        let len = c.u32()? as usize;
        let s = c.str(len)?;
        let cert = || CertId::parse(s).ok_or_else(|| format!("{s:?} is not a certificate id"));
        match kind {
            b'i' | b'v' => {
                let (map, names) = if kind == b'i' {
                    (&mut self.ids, &mut l.ids)
                } else {
                    (&mut self.vias, &mut l.vias)
                };
                let held = names.hold(s);
                if let Some(old) = map.insert(index, held) {
                    names.release(old);
                }
            }
            b'a' => {
                let i = l.anchor_index(&cert()?);
                self.anchors.insert(index, i);
            }
            b's' => {
                let i = l.issuer_index(&cert()?);
                self.issuers.insert(index, i);
            }
            k => return Err(format!("unknown name kind {k}")),
        }
        Ok(())
    }

    /// Gives the ledger's names back the holds the file took.
    fn release(self, l: &mut Ledger) {
        for i in self.ids.into_values() {
            l.ids.release(i);
        }
        for i in self.vias.into_values() {
            l.vias.release(i);
        }
    }

    fn leaf(&self, l: &mut Ledger, c: &mut Cursor<'_>) -> Result<(), String> {
        let key: Key = u128::from_le_bytes(c.array::<16>()?);
        let serial_len = c.u8()?;
        let serial = c.array::<16>()?;
        let [id, via, issued, not_after, version] =
            [c.u32()?, c.u32()?, c.u32()?, c.u32()?, c.u32()?];
        let (anchor, issuer) = (c.u16()?, c.u16()?);
        let api = c.u8()?;
        let api = api_of(api).ok_or_else(|| format!("unknown face {api}"))?;
        let serial = if serial_len == ODD_SERIAL {
            let n = c.u32()? as usize;
            Serial::Text(c.str(n)?)
        } else if serial_len <= 16 {
            // The bytes as a leaf holds them (what follows the serial zeroed, as from text).
            let n = usize::from(serial_len);
            let mut held = [0u8; 16];
            held[..n].copy_from_slice(&serial[..n]);
            Serial::Bytes(held, serial_len)
        } else {
            return Err(format!("a serial of {serial_len} bytes"));
        };
        let unknown = |what: &str, i: u32| format!("a leaf names {what} {i}, never defined");
        let id = *self.ids.get(&id).ok_or_else(|| unknown("identity", id))?;
        let via = match via {
            NONE => None,
            v => Some(*self.vias.get(&v).ok_or_else(|| unknown("via", v))?),
        };
        let anchor = *self
            .anchors
            .get(&u32::from(anchor))
            .ok_or_else(|| unknown("anchor", anchor.into()))?;
        let issuer = match issuer {
            u16::MAX => u16::MAX,
            i => *self
                .issuers
                .get(&u32::from(i))
                .ok_or_else(|| unknown("issuer", i.into()))?,
        };
        l.put(Incoming {
            key,
            serial,
            id: Name::Held(id),
            via: via.map(Name::Held),
            anchor,
            issuer,
            issued: i64::from(issued),
            not_after: i64::from(not_after),
            version: u64::from(version),
            api,
        });
        Ok(())
    }
}

/// Reads a version-2 file. The leaves it holds are not queued (the file has them).
pub fn read(bytes: &[u8]) -> Result<ReadLedger, String> {
    let mut c = Cursor(bytes);
    if c.take(MAGIC.len()).ok() != Some(&MAGIC[..]) {
        return Err("not a version-2 ledger".into());
    }
    let mut ledger: Option<Ledger> = None;
    let mut names = FileNames::default();
    let (mut closed, mut records) = (false, 0);
    let mut frame_no = 0;
    while !c.0.is_empty() {
        frame_no += 1;
        let at = |e: String| format!("frame {frame_no}: {e}");
        let whole = c.0;
        let len = c.u32().map_err(at)? as usize;
        let payload = c.take(len).map_err(at)?;
        let s = c.array::<8>().map_err(at)?;
        if s != sum(&whole[..4 + len]) {
            return Err(at(
                "its checksum does not match (a torn or altered write)".into()
            ));
        }
        if closed {
            return Err(at("data after the closing frame".into()));
        }
        let mut p = Cursor(payload);
        while !p.0.is_empty() {
            let item = p.u8().map_err(at)?;
            let Some(l) = ledger.as_mut() else {
                if item != b'H' {
                    return Err(at("no header".into()));
                }
                let t = i64::from_le_bytes(p.array().map_err(at)?);
                let since =
                    OffsetDateTime::from_unix_timestamp(t).map_err(|e| at(e.to_string()))?;
                ledger = Some(Ledger::new(since));
                continue;
            };
            match item {
                _ if closed => return Err(at("data after the closing item".into())),
                b'C' => closed = true,
                b'N' => names.define(l, &mut p).map_err(at)?,
                b'L' => {
                    names.leaf(l, &mut p).map_err(at)?;
                    records += 1;
                }
                item => return Err(at(format!("unknown item {item}"))),
            }
        }
    }
    let mut ledger = ledger.ok_or("no header")?;
    names.release(&mut ledger);
    for s in std::mem::take(&mut ledger.queued) {
        ledger.slots[s as usize].queued = false;
    }
    Ok(ReadLedger {
        ledger,
        closed,
        records,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::ledger::{Leaf, LeafRecord};

    fn at(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(s).unwrap()
    }

    fn held(l: &Ledger) -> Vec<String> {
        let mut v: Vec<String> = l.records().map(|r| format!("{r:?}")).collect();
        v.sort();
        v
    }

    #[test]
    fn a_leaf_is_sixty_bytes_in_memory() {
        assert_eq!(std::mem::size_of::<Leaf>(), 60);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record {
            id: u8,
            inst: u8,
            via: Option<u8>,
            serial: u8,
            issued: i64,
            na: i64,
        },
        Compact(i64),
        Append,
        Rewrite,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..6, 0u8..4, proptest::option::of(0u8..3), any::<u8>(), 0i64..5, 1i64..300)
                .prop_map(|(id, inst, via, serial, issued, na)| Op::Record { id, inst, via, serial, issued, na }),
            1 => (0i64..400).prop_map(Op::Compact),
            2 => Just(Op::Append),
            1 => Just(Op::Rewrite),
        ]
    }

    fn record(id: u8, inst: u8, via: Option<u8>, serial: u8, issued: i64, na: i64) -> LeafRecord {
        LeafRecord {
            // Some serials are meshca's (hex), some are not (kept as text).
            serial: if serial.is_multiple_of(3) {
                format!("odd-{serial}")
            } else {
                format!("{serial:02x}{:030x}", u128::from(serial) * 7919)
            },
            spiffe_id: format!("spiffe://td/ns/n{}/sa/s{id}", id % 2),
            instance: format!("pod-{inst}"),
            anchor: crate::pki::CertId::of(&[id % 2]),
            issued,
            not_after: na,
            // The bundle handed out is the current one: versions never go back either.
            bundle_version: u64::try_from(issued / 20).unwrap_or(0),
            via: via.map(|v| format!("k8s:istio-system/ztunnel@node-{v}")),
            issuer: serial
                .is_multiple_of(2)
                .then(|| crate::pki::CertId::of(&[serial % 5])),
            api: Api::ALL[usize::from(serial) % Api::ALL.len()],
        }
    }

    proptest! {
        /// The file, appended batch by batch and rewritten now and then, reads back as the
        /// ledger that wrote it: the same leaves and the same gate summary, even when names
        /// were freed by compaction and their indices reused by later batches.
        #[test]
        fn what_is_written_reads_back_the_same(ops in proptest::collection::vec(op(), 1..150)) {
            let mut l = Ledger::new(at(7));
            let mut file = Vec::new();
            l.write_all(&mut file);
            // Leaves are recorded in signing order (issue times and bundle versions never go
            // back); compactions come at any time.
            let (mut signed, mut last_compaction) = (0, 0);
            for o in ops {
                match o {
                    Op::Record { id, inst, via, serial, issued, na } => {
                        signed += issued;
                        l.record(record(id, inst, via, serial, signed, signed + na));
                    }
                    // As the server's flush does: the queue is written, then expired leaves
                    // are dropped.
                    Op::Compact(now) => {
                        last_compaction = last_compaction.max(now);
                        l.write_queued(&mut file);
                        l.compact(at(now), Duration::ZERO);
                    }
                    Op::Append => {
                        l.write_queued(&mut file);
                    }
                    Op::Rewrite => {
                        file.clear();
                        l.write_all(&mut file);
                    }
                }
            }
            l.write_queued(&mut file);
            file.extend_from_slice(&closed_frame());
            let mut back = read(&file).map_err(TestCaseError::fail)?;
            prop_assert!(back.closed);
            // The file still holds what the writer compacted since its last rewrite; the
            // reader drops it at the same time.
            back.ledger.compact(at(last_compaction), Duration::ZERO);
            l.compact(at(last_compaction), Duration::ZERO);
            prop_assert_eq!(held(&l), held(&back.ledger));
            let max = Duration::from_secs(3600);
            let now = at(last_compaction + 1);
            prop_assert_eq!(
                l.summary_by_scan(now, max, Duration::ZERO, 2),
                back.ledger.summary_by_scan(now, max, Duration::ZERO, 2)
            );
            prop_assert_eq!(back.ledger.complete_since(), at(7));
            prop_assert_eq!(back.ledger.queued(), 0, "what was read is not written again");
        }
    }

    #[test]
    fn a_torn_altered_or_overlong_file_is_refused() {
        let mut l = Ledger::new(at(0));
        for i in 0..5 {
            l.record(record(i, i, Some(i), i + 1, 1, 100));
        }
        let mut file = Vec::new();
        l.write_all(&mut file);
        file.extend_from_slice(&closed_frame());
        assert_eq!(read(&file).unwrap().records, 5);
        // Torn: the last append cut short.
        let torn = &file[..file.len() - 3];
        assert!(
            read(torn).unwrap_err().contains("truncated"),
            "{:?}",
            read(torn).err()
        );
        // One byte altered inside a leaf.
        let mut altered = file.clone();
        altered[60] ^= 1;
        assert!(read(&altered).unwrap_err().contains("checksum"));
        // Anything after the closing frame.
        let mut after = file.clone();
        l.record(record(9, 9, None, 7, 2, 100));
        l.write_queued(&mut after);
        assert!(read(&after).unwrap_err().contains("after the closing"));
        // Not this format at all.
        assert!(read(b"{\"ledger\":1}").is_err());
    }
}
