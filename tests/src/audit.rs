//! Every audit record a test reads is checked against the published JSON
//! Schemas (docs/audit.schema.json for `format = "json"`,
//! docs/audit-ecs.schema.json for `format = "ecs"`): a record that does not
//! validate fails the test with the record and the errors.

use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::daemon::workspace_root;

fn load(name: &str) -> Result<jsonschema::Validator> {
    let path = workspace_root().join("docs").join(name);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let schema: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| anyhow::anyhow!("{}: not a valid schema: {e}", path.display()))
}

fn validators() -> &'static (jsonschema::Validator, jsonschema::Validator) {
    static V: OnceLock<(jsonschema::Validator, jsonschema::Validator)> = OnceLock::new();
    V.get_or_init(|| {
        (
            load("audit.schema.json").expect("docs/audit.schema.json"),
            load("audit-ecs.schema.json").expect("docs/audit-ecs.schema.json"),
        )
    })
}

/// Checks one record against the schema of its format (ECS if it has an
/// `@timestamp`).
pub fn validate_record(rec: &Value) -> Result<()> {
    let (json, ecs) = validators();
    let (v, name) =
        if rec.get("@timestamp").is_some() { (ecs, "audit-ecs.schema.json") } else { (json, "audit.schema.json") };
    let errors: Vec<String> = v.iter_errors(rec).map(|e| format!("  {} (at {})", e, e.instance_path)).collect();
    if !errors.is_empty() {
        bail!("audit record does not validate against docs/{name}:\n{rec}\n{}", errors.join("\n"));
    }
    Ok(())
}

/// Parses and validates the lines of an audit log.
pub fn parse_audit_text(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).with_context(|| format!("audit line {l:?}"))?;
            validate_record(&v)?;
            Ok(v)
        })
        .collect()
}
