//! What the unit tests of `config` share: settings from a list of pairs, and
//! temporary files.

use super::*;
use std::collections::HashMap;

/// Settings from `pairs` alone, with the local stub's API URL and key as defaults in
/// either build.
pub(super) fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    settings_with(pairs, Some(api::STUB_DEFAULTS))
}

/// Settings from `pairs` alone, with `api_defaults` for the API URL and key.
pub(super) fn settings_with(
    pairs: &[(&str, &str)],
    api_defaults: Option<api::DevDefaults>,
) -> Result<Settings, ConfigError> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::from_lookup_with(|k| m.get(k).cloned(), api_defaults)
}

/// A temporary file holding `text`, removed when dropped.
pub(super) struct TempFile(std::path::PathBuf);

impl TempFile {
    pub(super) fn new(text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("loansync-secret-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    pub(super) fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
