//! An agent's daily budget: what its model calls spent today (recorded in its memory
//! with each answered turn, see `memory::Spent`), what failed turns spent since
//! (kept here until the next answered turn records it), and whether a limit of the
//! spec's `budget` is reached. Days are UTC.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use nexo_api::report::OverBudget;
use nexo_api::spec::BudgetSpec;

use crate::memory::Spent;

/// What the person talking to an agent over its budget is told.
pub const BUDGET_MESSAGE: &str =
    "this agent has used up its budget for today (UTC); try again tomorrow";

/// The UTC day of `at`, as `YYYY-MM-DD`.
pub fn day_of(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d").to_string()
}

/// Which limit `spent` reached: `tokensPerDay` or `costPerDay`.
pub fn reached(budget: &BudgetSpec, spent: &Spent) -> Option<&'static str> {
    if budget.tokens_per_day.is_some_and(|max| spent.tokens >= max) {
        Some("tokensPerDay")
    } else if budget.cost_per_day.is_some_and(|max| spent.cost >= max) {
        Some("costPerDay")
    } else {
        None
    }
}

/// The spending of one agent that its memory does not hold yet, and what it last
/// knew of today's total.
#[derive(Default)]
pub struct Spending {
    /// Spent by turns that failed after a model call (nothing of theirs is
    /// recorded): added to the next answered turn's record.
    unrecorded: Mutex<Spent>,
    /// Today's total when last checked or recorded, with the limit it reached.
    known: Mutex<Option<(Spent, Option<&'static str>)>>,
}

impl Spending {
    /// What failed turns spent on `day` that is not recorded yet (the rest, of an
    /// earlier day, no longer counts against a budget and is dropped).
    pub fn unrecorded(&self, day: &str) -> Spent {
        let unrecorded = self.unrecorded.lock().unwrap();
        if unrecorded.day == day {
            unrecorded.clone()
        } else {
            Spent::on(day)
        }
    }

    /// A failed turn spent `spent`: kept until an answered turn records it.
    pub fn add_unrecorded(&self, spent: &Spent) {
        let mut unrecorded = self.unrecorded.lock().unwrap();
        if unrecorded.day != spent.day {
            *unrecorded = Spent::on(spent.day.clone());
        }
        unrecorded.add(spent);
    }

    /// An answered turn recorded the unrecorded spending of `day` too.
    pub fn recorded(&self, day: &str) {
        let mut unrecorded = self.unrecorded.lock().unwrap();
        if unrecorded.day == day {
            *unrecorded = Spent::on(day);
        }
    }

    /// Today's total is `total`, of which the `budget` limit it reached.
    pub fn know(&self, total: Spent, reached: Option<&'static str>) {
        *self.known.lock().unwrap() = Some((total, reached));
    }

    /// The entry of `/catalog`'s `overBudget` for `agent`, when it is over on `day`.
    pub fn over_budget(&self, agent: &str, day: &str) -> Option<OverBudget> {
        let known = self.known.lock().unwrap();
        let (spent, limit) = known.as_ref()?;
        Some(OverBudget {
            agent: agent.to_owned(),
            day: spent.day.clone(),
            tokens: spent.tokens,
            cost: spent.cost,
            limit: (*limit)?.to_owned(),
        })
        .filter(|_| spent.day == day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spent(tokens: u64, cost: f64) -> Spent {
        Spent {
            day: "2026-12-01".into(),
            tokens,
            cost,
        }
    }

    #[test]
    fn a_limit_is_reached_at_its_value() {
        let budget = BudgetSpec {
            tokens_per_day: Some(100),
            cost_per_day: Some(0.5),
        };
        assert_eq!(reached(&budget, &spent(99, 0.49)), None);
        assert_eq!(reached(&budget, &spent(100, 0.0)), Some("tokensPerDay"));
        assert_eq!(reached(&budget, &spent(0, 0.5)), Some("costPerDay"));
        assert_eq!(reached(&BudgetSpec::default(), &spent(u64::MAX, 1e9)), None);
    }

    #[test]
    fn unrecorded_spending_of_an_earlier_day_does_not_count() {
        let spending = Spending::default();
        spending.add_unrecorded(&spent(10, 0.1));
        spending.add_unrecorded(&spent(5, 0.0));
        assert_eq!(spending.unrecorded("2026-12-01").tokens, 15);
        assert_eq!(spending.unrecorded("2026-12-02"), Spent::on("2026-12-02"));
        spending.recorded("2026-12-01");
        assert_eq!(spending.unrecorded("2026-12-01").tokens, 0);
    }

    #[test]
    fn the_report_shows_only_today_and_only_when_over() {
        let spending = Spending::default();
        spending.know(spent(10, 0.0), None);
        assert_eq!(spending.over_budget("d/a", "2026-12-01"), None);
        spending.know(spent(100, 0.0), Some("tokensPerDay"));
        let over = spending.over_budget("d/a", "2026-12-01").unwrap();
        assert_eq!((over.tokens, over.limit.as_str()), (100, "tokensPerDay"));
        assert_eq!(spending.over_budget("d/a", "2026-12-02"), None);
    }

    #[test]
    fn the_day_is_utc() {
        let at = DateTime::parse_from_rfc3339("2026-12-01T23:30:00-02:00").unwrap();
        assert_eq!(day_of(at.with_timezone(&Utc)), "2026-12-02");
    }
}
