//! `nftmutant`: an `nft` stand-in for `scripts/mutants`. Installed as `nft`
//! first in sessiond's PATH (sessiond runs with `--nft-binary`), it passes
//! every command to the real nft, except that a JSON batch (`nft -j -f -`)
//! that writes sessiond's table `inet sessiongate` is weakened by one
//! mutation first: a rule deleted, one match of a rule dropped (widened), a
//! refusal turned into accept, a base chain's policy turned to accept, or a
//! set flag dropped. It owns nothing and changes nothing else: batches of
//! other tables and every other nft command pass through untouched.
//!
//! Environment:
//! - `SG_MUTANT_REAL_NFT`: the real nft binary (default `/usr/sbin/nft`);
//! - `SG_MUTANT_LIST=FILE`: append every mutation this batch allows to FILE,
//!   one `ID<TAB>DESCRIPTION` line each, and apply none;
//! - `SG_MUTANT=ID`: apply that mutation wherever it applies.
//!
//! A mutation's ID names the chain and a hash of the rule's expression, so
//! the same mutation applies to every batch sessiond writes (lockdown,
//! session, re-applies) that holds that rule. The link-level table's
//! per-interface chains (`egress0`, `egress1`, ...) count as one chain,
//! `egress`: the product installs one rule list on every interface, so a
//! mutation of it applies to all of them.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};

use serde_json::Value;

const OUR_TABLE: &str = "sessiongate";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let real = std::env::var("SG_MUTANT_REAL_NFT").unwrap_or_else(|_| "/usr/sbin/nft".into());
    let batch = args.iter().any(|a| a == "-j") && args.windows(2).any(|w| w[0] == "-f" && w[1] == "-");
    if !batch {
        let err = Command::new(&real).args(&args).exec();
        eprintln!("nftmutant: cannot run {real}: {err}");
        return ExitCode::from(127);
    }
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("nftmutant: reading the batch: {e}");
        return ExitCode::from(1);
    }
    let output = match serde_json::from_str::<Value>(&input) {
        Ok(mut doc) if writes_our_rules(&doc) => {
            if let Ok(list) = std::env::var("SG_MUTANT_LIST") {
                append_candidates(&list, &doc);
            } else if let Ok(id) = std::env::var("SG_MUTANT") {
                if apply(&mut doc, &id) {
                    eprintln!("nftmutant: applied {id}");
                }
            }
            doc.to_string()
        }
        _ => input,
    };
    run_real(&real, &args, &output)
}

fn run_real(real: &str, args: &[String], input: &str) -> ExitCode {
    let child = Command::new(real)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nftmutant: cannot run {real}: {e}");
            return ExitCode::from(127);
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        if let Err(e) = stdin.write_all(input.as_bytes()) {
            eprintln!("nftmutant: writing to nft: {e}");
        }
    }
    match child.wait() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("nftmutant: waiting for nft: {e}");
            ExitCode::from(1)
        }
    }
}

fn commands(doc: &Value) -> &[Value] {
    doc.get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The object an `add` command adds, if it is of `kind` and in our table.
fn added<'a>(cmd: &'a Value, kind: &str) -> Option<&'a Value> {
    let obj = cmd.get("add")?.get(kind)?;
    (obj.get("table")? == OUR_TABLE || (kind == "table" && obj.get("name")? == OUR_TABLE)).then_some(obj)
}

fn writes_our_rules(doc: &Value) -> bool {
    commands(doc).iter().any(|c| added(c, "rule").is_some())
}

/// FNV-1a of the rule's chain and expression, as 12 hex digits. A
/// redirect's port is left out: the DNS stub picks a new one each run.
/// A chain's name for mutation IDs: `egressN` is `egress` (see the top).
fn chain_of(name: &str) -> &str {
    match name.strip_prefix("egress") {
        Some(index) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => "egress",
        _ => name,
    }
}

/// The chain a rule or chain object belongs to, as `chain_of` names it.
fn chain_name<'a>(obj: &'a Value, key: &str) -> &'a str {
    chain_of(obj[key].as_str().unwrap_or("?"))
}

fn rule_id(rule: &Value) -> String {
    let mut expr = rule["expr"].clone();
    for stmt in expr.as_array_mut().into_iter().flatten() {
        if let Some(redirect) = stmt.get_mut("redirect") {
            *redirect = Value::Null;
        }
    }
    let text = format!("\"{}\"|{expr}", chain_name(rule, "chain"));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

fn is_match(stmt: &Value) -> bool {
    stmt.get("match").is_some()
}

/// A refusal: reject, drop, or a jump/goto to the refuse chain.
fn is_refusal(stmt: &Value) -> bool {
    stmt.get("reject").is_some()
        || stmt.get("drop").is_some()
        || ["jump", "goto"]
            .iter()
            .any(|k| stmt.get(k).is_some_and(|j| j["target"] == "refuse"))
}

/// One statement in nft's own words, roughly (for reports).
fn describe_stmt(stmt: &Value) -> String {
    if let Some(m) = stmt.get("match") {
        let side = |v: &Value| -> String {
            if let Some(ct) = v.get("ct") {
                return format!("ct {}", ct["key"].as_str().unwrap_or("?"));
            }
            if let Some(s) = v.get("set").and_then(Value::as_array) {
                let items: Vec<String> = s.iter().map(describe_value).collect();
                return format!("{{ {} }}", items.join(", "));
            }
            if let Some(c) = v.get("concat").and_then(Value::as_array) {
                let items: Vec<String> = c.iter().map(describe_side).collect();
                return items.join(" . ");
            }
            describe_side(v)
        };
        let op = m["op"].as_str().unwrap_or("?");
        return format!("{} {op} {}", side(&m["left"]), side(&m["right"]));
    }
    if let Some((key, value)) = stmt.as_object().and_then(|o| o.iter().next()) {
        return match value {
            Value::Null => key.clone(),
            Value::Object(o) if o.contains_key("target") => {
                format!("{key} {}", o["target"].as_str().unwrap_or("?"))
            }
            _ => format!("{key} {value}"),
        };
    }
    stmt.to_string()
}

/// A match operand: a meta key, a payload field, or a value.
fn describe_side(v: &Value) -> String {
    if let Some(meta) = v.get("meta") {
        return format!("meta {}", meta["key"].as_str().unwrap_or("?"));
    }
    if let Some(p) = v.get("payload") {
        return format!(
            "{} {}",
            p["protocol"].as_str().unwrap_or("?"),
            p["field"].as_str().unwrap_or("?")
        );
    }
    describe_value(v)
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) if o.contains_key("prefix") => format!(
            "{}/{}",
            o["prefix"]["addr"].as_str().unwrap_or("?"),
            o["prefix"]["len"]
        ),
        other => other.to_string(),
    }
}

fn describe_rule(rule: &Value) -> String {
    let stmts: Vec<String> = rule["expr"]
        .as_array()
        .into_iter()
        .flatten()
        .map(describe_stmt)
        .collect();
    format!("{}: {}", chain_name(rule, "chain"), stmts.join(" "))
}

/// Every mutation this batch allows, as (id, description).
fn candidates(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for cmd in commands(doc) {
        if let Some(rule) = added(cmd, "rule") {
            let id = rule_id(rule);
            let chain = chain_name(rule, "chain");
            let what = describe_rule(rule);
            out.push((format!("delete:{chain}:{id}"), format!("delete rule [{what}]")));
            let stmts = rule["expr"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            for (i, stmt) in stmts.iter().enumerate() {
                if is_match(stmt) {
                    out.push((
                        format!("widen:{chain}:{id}:{i}"),
                        format!("drop match `{}` from [{what}]", describe_stmt(stmt)),
                    ));
                }
                if is_refusal(stmt) {
                    out.push((
                        format!("accept:{chain}:{id}:{i}"),
                        format!("`{}` becomes accept in [{what}]", describe_stmt(stmt)),
                    ));
                }
            }
        }
        if let Some(chain) = added(cmd, "chain") {
            if chain.get("policy").is_some_and(|p| p == "drop") {
                let name = chain_name(chain, "name");
                out.push((
                    format!("policy:{name}"),
                    format!("chain {name}: policy drop becomes accept"),
                ));
            }
        }
        if let Some(set) = added(cmd, "set") {
            let name = set["name"].as_str().unwrap_or("?");
            for flag in set["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                out.push((
                    format!("setflag:{name}:{flag}"),
                    format!("set {name}: flag {flag} dropped"),
                ));
            }
        }
    }
    out
}

fn append_candidates(path: &str, doc: &Value) {
    let lines: String = candidates(doc)
        .into_iter()
        .map(|(id, what)| format!("{id}\t{what}\n"))
        .collect();
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
    match file {
        Ok(mut f) => {
            if let Err(e) = f.write_all(lines.as_bytes()) {
                eprintln!("nftmutant: writing {path}: {e}");
            }
        }
        Err(e) => eprintln!("nftmutant: opening {path}: {e}"),
    }
}

/// Applies mutation `id` to every place in the batch it names; true when
/// something changed.
fn apply(doc: &mut Value, id: &str) -> bool {
    let parts: Vec<&str> = id.split(':').collect();
    let Some(list) = doc.get_mut("nftables").and_then(Value::as_array_mut) else {
        return false;
    };
    let mut changed = false;
    match parts.as_slice() {
        ["delete", chain, rid] => {
            list.retain(|cmd| {
                let hit = added(cmd, "rule")
                    .is_some_and(|r| chain_name(r, "chain") == *chain && rule_id(r) == *rid);
                changed |= hit;
                !hit
            });
        }
        [kind @ ("widen" | "accept"), chain, rid, index] => {
            let Ok(index) = index.parse::<usize>() else {
                return false;
            };
            for cmd in list.iter_mut() {
                let hit = added(cmd, "rule")
                    .is_some_and(|r| chain_name(r, "chain") == *chain && rule_id(r) == *rid);
                if !hit {
                    continue;
                }
                let Some(expr) = cmd["add"]["rule"]["expr"].as_array_mut() else {
                    continue;
                };
                if index >= expr.len() {
                    continue;
                }
                if *kind == "widen" {
                    expr.remove(index);
                } else {
                    expr[index] = serde_json::json!({ "accept": null });
                }
                changed = true;
            }
        }
        ["policy", name] => {
            for cmd in list.iter_mut() {
                if added(cmd, "chain").is_some_and(|c| chain_name(c, "name") == *name) {
                    cmd["add"]["chain"]["policy"] = Value::from("accept");
                    changed = true;
                }
            }
        }
        ["setflag", name, flag] => {
            for cmd in list.iter_mut() {
                if added(cmd, "set").is_some_and(|s| s["name"] == *name) {
                    if let Some(flags) = cmd["add"]["set"]["flags"].as_array_mut() {
                        let before = flags.len();
                        flags.retain(|f| f != flag);
                        changed |= flags.len() != before;
                    }
                }
            }
        }
        _ => eprintln!("nftmutant: unknown mutation {id}"),
    }
    changed
}
