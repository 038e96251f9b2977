//! Captions for datasets that have none (Food101): a template filled with the class's human label.
use anyhow::{bail, Result};

/// The placeholder a template must contain; it is replaced by the class label.
pub const LABEL_PLACEHOLDER: &str = "{label}";

/// Default template. The study does not state its prompts; this is the CLIP zero-shot prompt
/// for Food101 ("a photo of {}, a type of food."), without the full stop.
pub const DEFAULT_TEMPLATE: &str = "a photo of {label}, a type of food";

/// A caption template such as `a photo of {label}, a type of food`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    template: String,
}

impl PromptTemplate {
    /// Fails when `template` lacks `{label}`: every caption would be the same, which is never meant.
    pub fn new(template: &str) -> Result<Self> {
        if !template.contains(LABEL_PLACEHOLDER) {
            bail!("prompt template {template:?} has no {LABEL_PLACEHOLDER} placeholder");
        }
        Ok(Self {
            template: template.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.template
    }

    /// The caption for a class with human label `label`.
    pub fn render(&self, label: &str) -> String {
        self.template.replace(LABEL_PLACEHOLDER, label)
    }
}

impl Default for PromptTemplate {
    fn default() -> Self {
        Self {
            template: DEFAULT_TEMPLATE.to_string(),
        }
    }
}

/// The label used in prompts for a class: Food101's `labels.txt` entry ("Apple pie") or, where
/// there is none, the class name with underscores as spaces ("apple_pie"), both lower-cased so
/// that the two layouts of one dataset give identical captions. (CLIP's tokenizer lower-cases
/// text anyway, so case never reaches the model.)
pub fn human_label(label_or_class_name: &str) -> String {
    label_or_class_name.trim().replace('_', " ").to_lowercase()
}
