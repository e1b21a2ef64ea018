//! The Deployment of a NATS extension that brings its own image. It connects to the
//! NATS of the worker pool it serves, with the same credentials the pool's workers
//! use, and answers tool calls on its subject.
//!
//! The process contract (environment variables):
//! `NEXO_EXTENSION` (`namespace/name`), `NEXO_EXTENSION_SUBJECT` (calls arrive here),
//! `NEXO_EXTENSION_ANNOUNCE` (where to announce tools), `NEXO_NATS_URLS`
//! (comma-separated), and when set on the pool: `NEXO_NATS_USER`,
//! `NEXO_NATS_PASSWORD`, `NEXO_NATS_TOKEN`, `NEXO_NATS_NKEY_SEED`,
//! `NEXO_NATS_CREDENTIALS_FILE`, `NEXO_NATS_TLS_CA_FILE`, `NEXO_NATS_TLS_CERT_FILE`,
//! `NEXO_NATS_TLS_KEY_FILE`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, LocalObjectReference, PodSpec, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};
use nexo_api::crd::{Extension, WorkerPool};
use nexo_api::{ResourceKey, subject};

use super::pod::{self, NATS_CREDS_DIR, NATS_TLS_DIR, NatsAccess, mount};

/// Name of an extension's Deployment. Not shortened: a Deployment name may have 253
/// characters, and what limits an Extension's name is its `instance` label (63).
pub fn deployment_name(extension: &str) -> String {
    format!("{extension}-extension")
}

fn selector_labels(extension: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "nexo-extension".to_owned(),
        ),
        (
            "app.kubernetes.io/instance".to_owned(),
            extension.to_owned(),
        ),
    ])
}

fn plain(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The Deployment of `extension` connected to `pool`'s NATS; `None` when the
/// extension is not a NATS extension with an image.
pub fn deployment(extension: &Extension, pool: &WorkerPool) -> Option<Deployment> {
    let image = extension.spec.nats.as_ref()?.image.clone()?;
    let name = extension.name_any();
    let key = ResourceKey::new(extension.namespace().unwrap_or_default(), &name);
    let nats = &pool.spec.nats;
    let access = NatsAccess::for_pool(nats);

    let mut env = vec![
        plain("NEXO_EXTENSION", key.to_string()),
        plain("NEXO_EXTENSION_SUBJECT", subject::extension_call(&key)),
        plain("NEXO_EXTENSION_ANNOUNCE", subject::EXTENSION_ANNOUNCE),
        plain("NEXO_NATS_URLS", nats.urls.join(",")),
    ];
    if let Some(user) = &nats.user {
        env.push(plain("NEXO_NATS_USER", user.name.clone()));
    }
    env.extend(access.env);
    if let Some(creds) = &nats.credentials {
        env.push(plain(
            "NEXO_NATS_CREDENTIALS_FILE",
            format!("{NATS_CREDS_DIR}/{}", creds.key),
        ));
    }
    if let Some(tls) = &nats.tls {
        env.push(plain(
            "NEXO_NATS_TLS_CA_FILE",
            format!("{NATS_TLS_DIR}/ca.crt"),
        ));
        if tls.client_certificate {
            env.push(plain(
                "NEXO_NATS_TLS_CERT_FILE",
                format!("{NATS_TLS_DIR}/tls.crt"),
            ));
            env.push(plain(
                "NEXO_NATS_TLS_KEY_FILE",
                format!("{NATS_TLS_DIR}/tls.key"),
            ));
        }
    }
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    volumes.extend(access.volumes);
    let mut mounts = vec![mount("tmp", "/tmp", false)];
    mounts.extend(access.mounts);

    let labels = selector_labels(&name);
    Some(Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: extension.namespace(),
            labels: Some(labels.clone()),
            owner_references: extension.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "extension".into(),
                        image: Some(image),
                        env: Some(env),
                        resources: Some(pod::default_resources()),
                        security_context: Some(pod::container_security()),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod::pod_security()),
                    // Extensions usually come from the pool's registry.
                    image_pull_secrets: (!pool.spec.image_pull_secrets.is_empty()).then(|| {
                        pool.spec
                            .image_pull_secrets
                            .iter()
                            .map(|name| LocalObjectReference { name: name.clone() })
                            .collect()
                    }),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}
