//! The trace reader on arbitrary bytes: it must return errors, never panic, hang or
//! allocate without bound.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use sensor_trace::TraceReader;

fuzz_target!(|data: &[u8]| {
    let input = Box::new(Cursor::new(data.to_vec()));
    if let Ok(reader) = TraceReader::from_reader("fuzz".into(), input) {
        for record in reader {
            if record.is_err() {
                break;
            }
        }
    }
});
