//! The configuration layers as lists of single keys ("leaves"), each with
//! where it came from: a TOML document (file or hardware profile), the
//! `RILL_*` environment, `--set` arguments. Every leaf is checked on its own
//! (known key, right type) before merging, so an error always names the key
//! and the line, variable or argument that set it; later layers then
//! override earlier ones key by key.

use std::collections::{BTreeMap, HashMap};

use toml::de::{DeTable, DeValue};

use super::Config;
use super::error::{ConfigError, Origin};
use super::keys::{self, KEYS, NON_CONFIG_VARIABLES, SECTIONS};

/// One key's value from one layer.
#[derive(Debug, Clone)]
pub(crate) struct Leaf {
    /// Dotted key, e.g. `limits.frame_bytes_max`.
    pub key: String,
    pub value: toml::Value,
    pub origin: Origin,
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The parser's message for `fsync = never` is about floats (`nan`); the
/// likely mistake is a missing pair of quotes, so say that.
fn unquoted_text_hint(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let line_end = text[offset..]
        .find('\n')
        .map_or(text.len(), |newline| offset + newline);
    let (key, value) = text[line_start..line_end].split_once('=')?;
    let value = value.split('#').next()?.trim();
    let bare_word = value.starts_with(|c: char| c.is_ascii_alphabetic())
        && !matches!(value, "true" | "false" | "nan" | "inf");
    bare_word.then(|| format!("; text values need quotes: {} = \"{value}\"", key.trim()))
}

/// Where each dotted key of a document starts, from the parser's spans.
fn key_offsets(table: &DeTable<'_>, prefix: &str, offsets: &mut HashMap<String, usize>) {
    for (key, value) in table {
        let dotted = join(prefix, key.get_ref());
        offsets.insert(dotted.clone(), key.span().start);
        if let DeValue::Table(inner) = value.get_ref() {
            key_offsets(inner, &dotted, offsets);
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The leaves of a TOML document, in document order. `origin_at` turns a
/// line and column into the origin to report; `metadata_table` names a table
/// that is not configuration (a profile's `[profile]`).
pub(crate) fn document_leaves(
    text: &str,
    origin_at: &dyn Fn(Option<(usize, usize)>) -> Origin,
    metadata_table: Option<&str>,
) -> Result<Vec<Leaf>, ConfigError> {
    let syntax_error = |error: toml::de::Error| {
        let offset = error.span().map(|span| span.start);
        let position = offset.map(|offset| line_column(text, offset));
        let hint = offset
            .and_then(|offset| unquoted_text_hint(text, offset))
            .unwrap_or_default();
        ConfigError::new(
            origin_at(position),
            None,
            format!("invalid TOML: {}{hint}", error.message().trim_end()),
        )
    };
    let document = DeTable::parse(text).map_err(syntax_error)?;
    let mut offsets = HashMap::new();
    key_offsets(document.get_ref(), "", &mut offsets);
    let mut table: toml::Table = text.parse().map_err(syntax_error)?;
    if let Some(metadata_table) = metadata_table {
        table.remove(metadata_table);
    }
    let mut leaves = Vec::new();
    collect_leaves(table, "", &mut |key, value| {
        let offset = offsets.get(&key).copied().unwrap_or(usize::MAX);
        let origin = origin_at(offsets.get(&key).map(|offset| line_column(text, *offset)));
        leaves.push((offset, Leaf { key, value, origin }));
    });
    // Document order, so the first problem reported is the first in the file.
    leaves.sort_by_key(|(offset, _)| *offset);
    let leaves: Vec<Leaf> = leaves.into_iter().map(|(_, leaf)| leaf).collect();
    for leaf in &leaves {
        check_leaf(leaf)?;
    }
    Ok(leaves)
}

/// Splits a table into leaves. A table stops being descended into where it
/// is the value of a key that takes a plain value, so `data_dir = { .. }`
/// is reported as a bad value of `data_dir` rather than an unknown key.
fn collect_leaves(table: toml::Table, prefix: &str, emit: &mut dyn FnMut(String, toml::Value)) {
    for (key, value) in table {
        let dotted = join(prefix, &key);
        match value {
            // An empty table with an unknown name (`[lmits]` whose keys were
            // never written) is a typo too, so it becomes a leaf to report.
            toml::Value::Table(inner)
                if inner.is_empty() && !SECTIONS.contains(&dotted.as_str()) =>
            {
                emit(dotted, toml::Value::Table(inner));
            }
            toml::Value::Table(inner) if keys::find(&dotted).is_none() => {
                collect_leaves(inner, &dotted, emit);
            }
            value => emit(dotted, value),
        }
    }
}

/// Checks that a leaf is a known key with a value of the right type.
fn check_leaf(leaf: &Leaf) -> Result<(), ConfigError> {
    let fail = |message: String| {
        Err(ConfigError::new(
            leaf.origin.clone(),
            Some(&leaf.key),
            message,
        ))
    };
    let Some(info) = keys::find(&leaf.key) else {
        if SECTIONS.contains(&leaf.key.as_str()) {
            return fail(format!(
                "`{0}` is a section, not a value; put its keys under a [{0}] header",
                leaf.key
            ));
        }
        let candidates = KEYS
            .iter()
            .map(|info| info.key)
            .chain(SECTIONS.iter().copied());
        let hint = keys::suggest(&leaf.key, candidates)
            .map(|near| format!("; did you mean `{near}`?"))
            .unwrap_or_default();
        return fail(format!(
            "unknown key{hint} (docs/config.md lists every key)"
        ));
    };
    let mut single = toml::Table::new();
    insert(&mut single, &leaf.key, leaf.value.clone());
    match single.try_into::<Config>() {
        Ok(_) => Ok(()),
        Err(error) => fail(keys::explain_value_error(
            error.message(),
            &leaf.value,
            info,
        )),
    }
}

/// The `RILL_*` variables as leaves, by variable name. Variables on the
/// non-configuration list are skipped; any other `RILL_` name must be a key,
/// so a typo stops the start instead of being silently ignored.
pub(crate) fn environment_leaves(env: &[(String, String)]) -> Result<Vec<Leaf>, ConfigError> {
    let by_variable: BTreeMap<String, &keys::KeyInfo> = KEYS
        .iter()
        .map(|info| (keys::environment_variable(info.key), info))
        .collect();
    let mut variables: Vec<&(String, String)> = env
        .iter()
        .filter(|(name, _)| name.starts_with("RILL_"))
        .filter(|(name, _)| !NON_CONFIG_VARIABLES.contains(&name.as_str()))
        .collect();
    variables.sort();
    let mut leaves = Vec::with_capacity(variables.len());
    for (name, raw_value) in variables {
        let origin = Origin::Environment {
            variable: name.clone(),
        };
        let Some(info) = by_variable.get(name) else {
            let candidates = by_variable
                .keys()
                .map(String::as_str)
                .chain(NON_CONFIG_VARIABLES.iter().copied());
            let hint = keys::suggest(name, candidates)
                .map(|near| format!(" Did you mean {near}?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                origin,
                None,
                format!(
                    "`{name}` matches no configuration key.{hint} Configuration variables are \
                     RILL_<SECTION>__<KEY> in capitals with a double underscore, e.g. \
                     RILL_LIMITS__FRAME_BYTES_MAX; unset the variable if it is not meant for Rill"
                ),
            ));
        };
        let leaf = Leaf {
            key: info.key.to_string(),
            value: keys::parse_override_value(raw_value, info),
            origin,
        };
        check_leaf(&leaf)?;
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// `--set section.key=value` arguments as leaves, in order (a later one wins).
pub(crate) fn set_leaves(sets: &[String]) -> Result<Vec<Leaf>, ConfigError> {
    let mut leaves = Vec::with_capacity(sets.len());
    for argument in sets {
        let origin = Origin::Set {
            argument: argument.clone(),
        };
        let Some((key, raw_value)) = argument.split_once('=') else {
            return Err(ConfigError::new(
                origin,
                None,
                "expected section.key=value, e.g. --set limits.frame_bytes_max=1048576",
            ));
        };
        let key = key.trim();
        let value = match keys::find(key) {
            Some(info) => keys::parse_override_value(raw_value.trim(), info),
            None => toml::Value::String(raw_value.to_string()),
        };
        let leaf = Leaf {
            key: key.to_string(),
            value,
            origin,
        };
        check_leaf(&leaf)?;
        leaves.push(leaf);
    }
    Ok(leaves)
}

/// Puts a value at a dotted key, creating the tables on the way.
pub(crate) fn insert(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    match dotted.split_once('.') {
        None => {
            table.insert(dotted.to_string(), value);
        }
        Some((section, rest)) => {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// The layers merged in order, later leaves winning, with the origin of
/// every key's final value.
pub(crate) fn merge<'l>(
    layers: impl IntoIterator<Item = &'l [Leaf]>,
) -> (toml::Table, BTreeMap<String, Origin>) {
    let mut table = toml::Table::new();
    let mut origins = BTreeMap::new();
    for leaf in layers.into_iter().flatten() {
        insert(&mut table, &leaf.key, leaf.value.clone());
        origins.insert(leaf.key.clone(), leaf.origin.clone());
    }
    (table, origins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters_from_one() {
        let text = "a = 1\n[node]\nshärds = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        let equals = text.find(" = 2").expect("present");
        assert_eq!(line_column(text, equals), (3, 7));
    }
}
