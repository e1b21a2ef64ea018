//! The test support's Prometheus text parser, on what it must tell apart.

mod support;

use support::prometheus::Scrape;

const TEXT: &str = r#"# HELP nexo_x_total Things.
# TYPE nexo_x_total counter
nexo_x_total{source="consume"} 12
nexo_x_total{source="publish"} 1
nexo_plain 3.5
nexo_odd{b="with \"quotes\", a comma and \\ a backslash",a="x"} 7 1700000000000
nexo_seconds_bucket{le="+Inf"} 4
"#;

#[test]
fn values_are_numbers_of_exactly_one_label_set() {
    let scrape = Scrape::parse(TEXT);
    // A substring match for `} 1` would have found the 12.
    assert_eq!(
        scrape.value("nexo_x_total", &[("source", "consume")]),
        Some(12.0)
    );
    assert_eq!(
        scrape.value("nexo_x_total", &[("source", "publish")]),
        Some(1.0)
    );
    assert_eq!(scrape.value("nexo_x_total", &[]), None);
    assert_eq!(scrape.value("nexo_plain", &[]), Some(3.5));
    assert_eq!(
        scrape.value("nexo_seconds_bucket", &[("le", "+Inf")]),
        Some(4.0)
    );
}

#[test]
fn escaped_label_values_and_timestamps_are_read() {
    let scrape = Scrape::parse(TEXT);
    let labels = [
        ("a", "x"),
        ("b", r#"with "quotes", a comma and \ a backslash"#),
    ];
    assert_eq!(scrape.value("nexo_odd", &labels), Some(7.0));
}

#[test]
#[should_panic(expected = "not a Prometheus sample")]
fn a_malformed_line_fails() {
    Scrape::parse("nexo_x_total{source=\"consume} 1\n");
}
