//! An agent's model and its fallbacks as one [`ChatModel`]: each call goes to the
//! first model whose circuit is not open, and on to the next when that one fails in
//! a way another endpoint may not (rate limit, server error, time-out, connection
//! failure, a stream that broke off: [`LlmError::is_retryable`], after the model's
//! own retries). A refused request or an unusable answer is returned as it is: the
//! next model would be sent the same request.
//!
//! Fallback is per call, not per turn: a call that falls back sends the same
//! request, which already holds the results of the tools run earlier in the turn,
//! so no tool runs twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use nexo_api::spec::{ModelSpec, NoFallbacks};

use super::breaker::{Admission, Breaker, Breakers, Endpoint};
use super::{Answered, ChatModel, ChatRequest, ChatResponse, Deltas, LlmError, PassedOver};
use crate::secrets::Secrets;

/// One model of the list, with the breaker of its endpoint.
struct Link {
    /// The model's name in metrics and events ([`ModelSpec::label`]).
    label: String,
    model: Arc<dyn ChatModel>,
    breaker: Arc<Breaker>,
}

/// The models of an agent, in the order they are tried.
pub struct Fallbacks {
    links: Vec<Link>,
}

impl Fallbacks {
    /// The models `spec` names (its own first, then `fallbacks`), each with the
    /// worker's breaker of its endpoint. Every key is read now: a fallback without
    /// its key is reported when the agent is built, not when it is first needed.
    /// Each model's calls are traced on their own (`record_content` as the agent's
    /// `observability` says).
    pub fn from_spec(
        spec: &ModelSpec,
        secrets: &Secrets,
        breakers: &Breakers,
        record_content: bool,
    ) -> Result<Self, LlmError> {
        let links = spec
            .chain()
            .into_iter()
            .map(|entry| {
                let provider =
                    super::from_spec(&entry.clone().with_fallbacks(Vec::new()), secrets)?;
                let model: Arc<dyn ChatModel> = Arc::new(super::Traced::new(
                    provider,
                    entry.model.clone(),
                    record_content,
                ));
                Ok(Link {
                    breaker: breakers.of(endpoint(&entry, model.provider())),
                    label: entry.label().to_owned(),
                    model,
                })
            })
            .collect::<Result<_, LlmError>>()?;
        Ok(Self { links })
    }

    /// The names of the models, in order.
    pub fn labels(&self) -> Vec<String> {
        self.links.iter().map(|l| l.label.clone()).collect()
    }

    /// The providers of the models, each once.
    pub fn providers(&self) -> Vec<&'static str> {
        let mut providers: Vec<_> = self.links.iter().map(|l| l.model.provider()).collect();
        providers.sort_unstable();
        providers.dedup();
        providers
    }
}

fn endpoint(spec: &ModelSpec<NoFallbacks>, provider: &'static str) -> Endpoint {
    Endpoint {
        provider,
        base_url: spec.base_url.clone().unwrap_or_default(),
        model: spec.label().to_owned(),
    }
}

/// Whether a failure of one model should go on to the next.
fn falls_through(err: &LlmError) -> bool {
    matches!(err, LlmError::CircuitOpen(_)) || err.is_retryable()
}

/// Forwards a call's text and remembers whether any came, so the next model's answer
/// can void it first.
struct Watched<'a> {
    inner: &'a dyn Deltas,
    sent: AtomicBool,
}

impl Deltas for Watched<'_> {
    fn text(&self, chunk: &str) {
        self.sent.store(true, Ordering::Relaxed);
        self.inner.text(chunk);
    }

    fn restart(&self) {
        self.sent.store(false, Ordering::Relaxed);
        self.inner.restart();
    }
}

/// An admitted call's slot in its breaker: a call dropped before it ended (its
/// turn was cancelled) gives a probe back instead of counting.
struct Admitted<'a> {
    breaker: &'a Breaker,
    admission: Admission,
    done: bool,
}

impl Admitted<'_> {
    fn record(mut self, ok: bool) {
        self.done = true;
        self.breaker.record(self.admission, ok);
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.abandon(self.admission);
        }
    }
}

#[async_trait]
impl ChatModel for Fallbacks {
    /// The provider of the agent's own model.
    fn provider(&self) -> &'static str {
        self.links[0].model.provider()
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        deltas: &dyn Deltas,
    ) -> Result<ChatResponse, LlmError> {
        let watched = Watched {
            inner: deltas,
            sent: AtomicBool::new(false),
        };
        let mut passed_over: Vec<PassedOver> = Vec::new();
        let mut last = None;
        for link in &self.links {
            let admission = link.breaker.admit();
            if admission == Admission::Skip {
                let err = LlmError::CircuitOpen(link.label.clone());
                passed_over.push(PassedOver {
                    model: link.label.clone(),
                    error: err.to_string(),
                });
                last = Some(err);
                continue;
            }
            if watched.sent.load(Ordering::Relaxed) {
                watched.restart();
            }
            let admitted = Admitted {
                breaker: &link.breaker,
                admission,
                done: false,
            };
            match link.model.complete(request, &watched).await {
                Ok(mut response) => {
                    admitted.record(true);
                    response.answered = Answered {
                        model: link.label.clone(),
                        provider: link.model.provider(),
                        passed_over,
                    };
                    return Ok(response);
                }
                Err(err) if falls_through(&err) => {
                    admitted.record(false);
                    tracing::warn!(model = %link.label, error = %err, "model failed");
                    passed_over.push(PassedOver {
                        model: link.label.clone(),
                        error: err.to_string(),
                    });
                    last = Some(err);
                }
                // The endpoint answered: the request is what failed.
                Err(err) => {
                    admitted.record(true);
                    return Err(err);
                }
            }
        }
        let last = last.expect("an agent has at least one model");
        Err(if self.links.len() == 1 {
            last
        } else {
            LlmError::Exhausted {
                passed_over,
                last: Box::new(last),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_http::HttpError;
    use std::sync::Mutex;

    /// Streams `text`, then answers with `result`.
    struct Streams {
        text: &'static str,
        fails: Option<u16>,
    }

    #[async_trait]
    impl ChatModel for Streams {
        fn provider(&self) -> &'static str {
            "openai"
        }

        async fn complete(
            &self,
            _: &ChatRequest,
            deltas: &dyn Deltas,
        ) -> Result<ChatResponse, LlmError> {
            deltas.text(self.text);
            match self.fails {
                Some(status) => Err(LlmError::Http(HttpError::Status {
                    status,
                    body: String::new(),
                })),
                None => Ok(ChatResponse {
                    text: self.text.to_owned(),
                    ..ChatResponse::default()
                }),
            }
        }
    }

    /// What a call streamed, `|` for each restart.
    #[derive(Default)]
    struct Seen(Mutex<String>);

    impl Deltas for Seen {
        fn text(&self, chunk: &str) {
            self.0.lock().unwrap().push_str(chunk);
        }

        fn restart(&self) {
            self.0.lock().unwrap().push('|');
        }
    }

    fn chain(models: Vec<(&str, Streams)>, failures: u32) -> Fallbacks {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("open", "open"),
            &["provider", "model"],
        )
        .unwrap();
        let breakers = Breakers::new(
            nexo_api::config::CircuitBreakerSettings {
                failures,
                cool_down_seconds: 3600,
            },
            gauge,
        );
        let links = models
            .into_iter()
            .map(|(label, model)| Link {
                breaker: breakers.of(Endpoint {
                    provider: "openai",
                    base_url: String::new(),
                    model: label.to_owned(),
                }),
                label: label.to_owned(),
                model: Arc::new(model),
            })
            .collect();
        Fallbacks { links }
    }

    #[tokio::test]
    async fn a_fallback_voids_the_text_the_failed_model_streamed() {
        let models = chain(
            vec![
                (
                    "a",
                    Streams {
                        text: "half",
                        fails: Some(503),
                    },
                ),
                (
                    "b",
                    Streams {
                        text: "whole",
                        fails: None,
                    },
                ),
            ],
            5,
        );
        let seen = Seen::default();
        let response = models
            .complete(&ChatRequest::default(), &seen)
            .await
            .unwrap();
        assert_eq!(*seen.0.lock().unwrap(), "half|whole");
        assert_eq!(response.answered.model, "b");
        assert_eq!(response.answered.passed_over[0].model, "a");
    }

    #[tokio::test]
    async fn an_open_circuit_is_skipped_and_without_a_fallback_fails_at_once() {
        let models = chain(
            vec![
                (
                    "a",
                    Streams {
                        text: "x",
                        fails: Some(500),
                    },
                ),
                (
                    "b",
                    Streams {
                        text: "y",
                        fails: None,
                    },
                ),
            ],
            1,
        );
        let seen = Seen::default();
        models
            .complete(&ChatRequest::default(), &seen)
            .await
            .unwrap();
        // `a` is open now: the next call does not reach it (nothing streamed from it).
        let seen = Seen::default();
        let response = models
            .complete(&ChatRequest::default(), &seen)
            .await
            .unwrap();
        assert_eq!(*seen.0.lock().unwrap(), "y");
        assert!(
            response.answered.passed_over[0]
                .error
                .contains("circuit open")
        );

        let alone = chain(
            vec![(
                "c",
                Streams {
                    text: "z",
                    fails: Some(500),
                },
            )],
            1,
        );
        assert!(
            alone
                .complete(&ChatRequest::default(), &seen)
                .await
                .is_err()
        );
        let err = alone
            .complete(&ChatRequest::default(), &seen)
            .await
            .unwrap_err();
        assert!(matches!(err, LlmError::CircuitOpen(_)), "{err}");
    }

    #[test]
    fn only_failures_of_the_endpoint_fall_through() {
        let status = |status| {
            LlmError::Http(HttpError::Status {
                status,
                body: String::new(),
            })
        };
        assert!(falls_through(&status(429)));
        assert!(falls_through(&status(503)));
        assert!(falls_through(&LlmError::Http(HttpError::Timeout(5))));
        assert!(falls_through(&LlmError::CircuitOpen("m".into())));
        assert!(!falls_through(&status(400)));
        assert!(!falls_through(&status(401)));
        assert!(!falls_through(&LlmError::InvalidResponse("x".into())));
        assert!(!falls_through(&LlmError::MissingKey("x".into())));
    }
}
