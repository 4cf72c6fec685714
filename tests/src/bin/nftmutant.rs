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
//! A mutation's ID names the layer and a hash of the rule's expression, so
//! the same mutation applies to every batch sessiond writes (lockdown,
//! session, re-applies) that holds that rule, and to every chain of the
//! layer that holds it: `output`, `refuse`, `postrouting` and the
//! link-level table's per-interface chains (`egress0`, `egress1`, ...) are
//! one layer, `out`, whose chains say the same rules again as a defence in
//! depth. A rule's identity leaves out its interface matches (a link-level
//! chain is the interface) and reads every refusal the same, so
//! `output: ... jump refuse`, `postrouting: ... drop` and `egress0: ...`
//! are one rule, deleted, widened or opened together.

use std::collections::{BTreeMap, BTreeSet};
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

/// The layer a chain belongs to, for mutation IDs. The kill switch says
/// most things more than once on the way out: `output` (with its `refuse`
/// chain), `postrouting` (the same rules again, for what `output` never
/// sees) and the link-level `egressN` chains (one per interface, the same
/// rule list on each) are one layer, `out`, so that a mutation weakens a
/// rule in every chain that holds it. Otherwise a weakened copy is covered
/// by the others and the mutant survives for that reason alone.
fn layer_of(chain: &str) -> &str {
    match chain {
        "output" | "postrouting" | "refuse" => "out",
        _ => match chain.strip_prefix("egress") {
            Some(index) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => "out",
            _ => chain,
        },
    }
}

/// The layer a rule or chain object belongs to.
fn layer_name<'a>(obj: &'a Value, key: &str) -> &'a str {
    layer_of(obj[key].as_str().unwrap_or("?"))
}

/// The chain's own name, `egressN` written `egress` (for reports).
fn chain_of(name: &str) -> &str {
    match name.strip_prefix("egress") {
        Some(index) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => "egress",
        _ => name,
    }
}

fn chain_name<'a>(obj: &'a Value, key: &str) -> &'a str {
    chain_of(obj[key].as_str().unwrap_or("?"))
}

/// A match on the interface a packet leaves or enters by: the link-level
/// chains hold no such match (each is the interface), so it is left out of
/// a rule's identity.
fn is_interface_match(stmt: &Value) -> bool {
    stmt.get("match")
        .and_then(|m| m["left"].get("meta"))
        .is_some_and(|meta| meta["key"] == "oifname" || meta["key"] == "iifname")
}

/// FNV-1a of `text`, as 12 hex digits.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// A rule's identity across the chains of its layer: a hash of its layer
/// and its expression, where interface matches are left out, every
/// refusal (`drop`, `reject`, `jump refuse`) reads the same, and a
/// redirect's port is left out (the DNS stub picks a new one each run).
/// So `output`'s `... jump refuse`, `postrouting`'s `... drop` and the
/// `egress` chains' same rule are one rule.
fn rule_id(rule: &Value) -> String {
    let expr: Vec<Value> = rule["expr"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|stmt| !is_interface_match(stmt))
        .map(|stmt| {
            if is_refusal(stmt) {
                serde_json::json!({ "refuse": null })
            } else if stmt.get("redirect").is_some() {
                serde_json::json!({ "redirect": null })
            } else {
                stmt.clone()
            }
        })
        .collect();
    fnv(&format!(
        "\"{}\"|{}",
        layer_name(rule, "chain"),
        Value::from(expr)
    ))
}

/// A match statement's identity within a rule (for `widen`).
fn match_id(stmt: &Value) -> String {
    fnv(&stmt.to_string())[..6].to_string()
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

/// Every mutation this batch allows, as (id, description). A rule held by
/// several chains of a layer gives one mutation, which names them all.
fn candidates(doc: &Value) -> Vec<(String, String)> {
    let mut found: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut add = |id: String, what: String, chain: &str| {
        found
            .entry(id)
            .or_insert_with(|| (what, BTreeSet::new()))
            .1
            .insert(chain.to_string());
    };
    for cmd in commands(doc) {
        if let Some(rule) = added(cmd, "rule") {
            let id = rule_id(rule);
            let layer = layer_name(rule, "chain");
            let chain = chain_name(rule, "chain");
            let what = describe_rule(rule);
            add(
                format!("delete:{layer}:{id}"),
                format!("delete rule [{what}]"),
                chain,
            );
            let stmts = rule["expr"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            for stmt in stmts {
                if is_match(stmt) {
                    add(
                        format!("widen:{layer}:{id}:{}", match_id(stmt)),
                        format!("drop match `{}` from [{what}]", describe_stmt(stmt)),
                        chain,
                    );
                }
            }
            if stmts.iter().any(is_refusal) {
                add(
                    format!("accept:{layer}:{id}"),
                    format!("the refusal becomes accept in [{what}]"),
                    chain,
                );
            }
        }
        if let Some(chain) = added(cmd, "chain") {
            if chain.get("policy").is_some_and(|p| p == "drop") {
                let layer = layer_name(chain, "name");
                add(
                    format!("policy:{layer}"),
                    format!("policy drop becomes accept in every base chain of layer {layer}"),
                    chain_name(chain, "name"),
                );
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
                add(
                    format!("setflag:{name}:{flag}"),
                    format!("set {name}: flag {flag} dropped"),
                    "sets",
                );
            }
        }
    }
    found
        .into_iter()
        .map(|(id, (what, chains))| {
            let chains: Vec<String> = chains.into_iter().collect();
            (id, format!("{what} (in {})", chains.join(", ")))
        })
        .collect()
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
    let is_rule = |cmd: &Value, layer: &str, rid: &str| {
        added(cmd, "rule").is_some_and(|r| layer_name(r, "chain") == layer && rule_id(r) == rid)
    };
    let mut changed = false;
    match parts.as_slice() {
        ["delete", layer, rid] => {
            list.retain(|cmd| {
                let hit = is_rule(cmd, layer, rid);
                changed |= hit;
                !hit
            });
        }
        [kind @ ("widen" | "accept"), layer, rid, rest @ ..] => {
            for cmd in list.iter_mut() {
                if !is_rule(cmd, layer, rid) {
                    continue;
                }
                let Some(expr) = cmd["add"]["rule"]["expr"].as_array_mut() else {
                    continue;
                };
                let before = expr.clone();
                match (*kind, rest) {
                    ("widen", [mid]) => expr.retain(|stmt| !(is_match(stmt) && match_id(stmt) == *mid)),
                    ("accept", []) => {
                        for stmt in expr.iter_mut().filter(|s| is_refusal(s)) {
                            *stmt = serde_json::json!({ "accept": null });
                        }
                    }
                    _ => {}
                }
                changed |= *expr != before;
            }
        }
        ["policy", layer] => {
            for cmd in list.iter_mut() {
                let hit = added(cmd, "chain").is_some_and(|c| {
                    layer_name(c, "name") == *layer && c.get("policy").is_some_and(|p| p == "drop")
                });
                if hit {
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
