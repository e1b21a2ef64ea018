//! Checks a document against a generated CRD's schema, for tests that have no API
//! server: the crds tests, and the chart tests for the resources the chart renders.

#![allow(dead_code)]

use nexo_operator::crds;
use serde_json::Value;

/// The `openAPIV3Schema` of the CRD of `kind`, as the API server receives it.
pub fn of_kind(kind: &str) -> Value {
    let crd = crds::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
    serde_json::to_value(&crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// What the API server checks of a value against a structural schema, as far as the
/// nexo CRDs use it: types, required properties, `pattern`, `maxLength`, `minimum` and
/// `maximum`. CEL rules are not evaluated here (the e2e test sends them to a real API
/// server). Each problem reads `path: what`.
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    check_value(schema, value, "", &mut problems);
    problems
}

fn check_value(schema: &Value, value: &Value, path: &str, problems: &mut Vec<String>) {
    let mut problem = |what: String| problems.push(format!("{path}: {what}"));
    if value.is_null() {
        if schema["nullable"] != true {
            problem("must not be null".into());
        }
        return;
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    let type_ok = match schema["type"].as_str() {
        _ if int_or_string => value.is_i64() || value.is_u64() || value.is_string(),
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        problem(format!("{value} is not of type {}", schema["type"]));
        return;
    }
    if let (Some(text), Some(pattern)) = (value.as_str(), schema["pattern"].as_str()) {
        let regex = regex::Regex::new(pattern).expect("a schema pattern compiles");
        if !regex.is_match(text) {
            problem(format!("{text:?} does not match {pattern}"));
        }
    }
    if let (Some(text), Some(max)) = (value.as_str(), schema["maxLength"].as_u64())
        && text.chars().count() as u64 > max
    {
        problem(format!("longer than {max} characters"));
    }
    if let (Some(number), Some(min)) = (value.as_f64(), schema["minimum"].as_f64())
        && number < min
    {
        problem(format!("{number} is below {min}"));
    }
    if let (Some(number), Some(max)) = (value.as_f64(), schema["maximum"].as_f64())
        && number > max
    {
        problem(format!("{number} is above {max}"));
    }
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten() {
            let required = required.as_str().unwrap();
            if !object.contains_key(required) {
                problems.push(format!("{}: required", join(required)));
            }
        }
        for (key, child) in object {
            let child_schema = match (&schema["properties"][key], &schema["additionalProperties"]) {
                (Value::Null, Value::Null) => continue,
                (Value::Null, additional) => additional,
                (property, _) => property,
            };
            check_value(child_schema, child, &join(key), problems);
        }
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            check_value(&schema["items"], item, &join(&i.to_string()), problems);
        }
    }
}
