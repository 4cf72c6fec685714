//! The fuzz targets without libFuzzer: `replay TARGET SECONDS DIR...` runs
//! TARGET's checks over every file in the DIRs (the seed corpus, and any
//! crash file given), then over random mutations of them until SECONDS have
//! passed. No coverage feedback and no sanitizer: a smoke fuzzer for
//! machines where `cargo fuzz` cannot build. A failing input is written to
//! `artifacts/TARGET/crash-replay-N` and the run exits 1.
//!
//! `replay TARGET 0 FILE...` just replays the given inputs (regressions).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(target), Some(seconds)) = (args.first(), args.get(1).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: replay TARGET SECONDS DIR_OR_FILE...");
        std::process::exit(2);
    };
    let Some((_, check)) = sessiongate_fuzz::TARGETS.iter().find(|(n, _)| n == target) else {
        eprintln!("replay: no target {target:?}");
        std::process::exit(2);
    };
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for arg in &args[2..] {
        let path = Path::new(arg);
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            match std::fs::read(&f) {
                Ok(bytes) => inputs.push(bytes),
                Err(e) => eprintln!("replay: skipping {}: {e}", f.display()),
            }
        }
    }
    if inputs.is_empty() {
        inputs.push(Vec::new());
    }
    // Payloads run in this process: a panic is caught, saved and reported.
    std::panic::set_hook(Box::new(|_| {}));
    let run = |input: &[u8]| std::panic::catch_unwind(|| check(input));
    let mut execs: u64 = 0;
    for input in &inputs {
        execs += 1;
        if let Err(panic) = run(input) {
            fail(target, None, &panic, execs);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rng = Rng(0x5347_5347_u64 ^ std::process::id() as u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let base = &inputs[rng.below(inputs.len())];
            let other = &inputs[rng.below(inputs.len())];
            let input = mutate(&mut rng, base, other);
            execs += 1;
            if let Err(panic) = run(&input) {
                fail(target, Some(&input), &panic, execs);
            }
        }
    }
    println!(
        "replay {target}: {execs} executions, {} seed inputs, no crash",
        inputs.len()
    );
}

/// Reports a panic; a mutated `input` is saved (a given one is a file already).
fn fail(target: &str, input: Option<&[u8]>, panic: &Box<dyn std::any::Any + Send>, execs: u64) -> ! {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into());
    eprintln!("replay {target}: CRASH after {execs} executions: {message}");
    if let Some(input) = input {
        let dir = Path::new("artifacts").join(target);
        let path = dir.join(format!("crash-replay-{execs}"));
        match std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, input)) {
            Ok(()) => eprintln!("replay {target}: input saved to {}", path.display()),
            Err(e) => eprintln!("replay {target}: could not save the input ({e}): {input:?}"),
        }
    }
    std::process::exit(1);
}

/// xorshift64*: deterministic per run, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"'",
    b"[",
    b"]",
    b"[[",
    b"=",
    b"\n",
    b"\r",
    b"\0",
    b"\\",
    b"\\u0000",
    b"{",
    b"}",
    b":",
    b",",
    b"/",
    b"#",
    b".",
    b"-",
    b"0",
    b"-1",
    b"65535",
    b"65536",
    b"4294967296",
    b"9999999999999999999999",
    b"::",
    b"[::1]",
    b"0.0.0.0/0",
    b"\xff",
    b"\xc3\xa9",
    b"null",
    b"true",
    b"[]",
    b"{}",
];

fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..=rng.below(4) {
        let pos = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let end = (pos + 1 + rng.below(8)).min(v.len());
                v.drain(pos.min(v.len())..end.max(pos.min(v.len())));
            }
            1 => {
                let b = rng.next() as u8;
                v.insert(pos, b);
            }
            2 if pos < v.len() => v[pos] ^= 1 << rng.below(8),
            3 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(pos..pos, token.iter().copied());
            }
            4 if !other.is_empty() => {
                // Splice a piece of another input in.
                let start = rng.below(other.len());
                let end = (start + 1 + rng.below(64)).min(other.len());
                v.splice(pos..pos, other[start..end].iter().copied());
            }
            5 if !v.is_empty() => {
                // Repeat a piece (long lines, deep nesting).
                let start = rng.below(v.len());
                let end = (start + 1 + rng.below(16)).min(v.len());
                let piece = v[start..end].to_vec();
                for _ in 0..rng.below(64) {
                    v.splice(start..start, piece.iter().copied());
                }
            }
            _ if pos < v.len() => v[pos] = rng.next() as u8,
            _ => v.push(rng.next() as u8),
        }
    }
    v.truncate(64 * 1024);
    v
}
