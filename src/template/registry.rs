//! The template registry: one copy of each distinct template, shared by
//! every session that uses it and freed when the last one lets go.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use super::attributes::Template;
use super::id::TemplateId;

/// Templates by id, shared by all sessions through an `Arc`.
///
/// Each entry counts the [`TemplateRef`]s that point at it. Counting and
/// removal happen under the entry's shard lock, so a template is never
/// removed while another session is acquiring it.
pub struct Registry {
    templates: DashMap<TemplateId, Entry>,
    references: AtomicUsize,
    acquisitions: AtomicU64,
    dedup_hits: AtomicU64,
}

struct Entry {
    template: Arc<Template>,
    refs: usize,
}

/// Counters for operators. Each is read separately, so under concurrent
/// use they need not add up exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Distinct templates held now.
    pub templates: usize,
    /// Live [`TemplateRef`]s now.
    pub references: usize,
    /// References taken by [`Registry::acquire`] or [`Registry::acquire_id`]
    /// since start (clones not counted).
    pub acquisitions: u64,
    /// Acquisitions that found their template already registered: every
    /// `acquire_id`, and each `acquire` after the first of its template.
    pub dedup_hits: u64,
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            templates: DashMap::new(),
            references: AtomicUsize::new(0),
            acquisitions: AtomicU64::new(0),
            dedup_hits: AtomicU64::new(0),
        }
    }

    /// Registers `template`, or finds the equal one already registered, and
    /// returns a reference that keeps it registered.
    pub fn acquire(self: &Arc<Self>, template: Template) -> TemplateRef {
        // Hash before taking the shard lock: it is the expensive part.
        let id = template.id();
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
        let shared = match self.templates.entry(id) {
            MapEntry::Occupied(mut occupied) => {
                self.dedup_hits.fetch_add(1, Ordering::Relaxed);
                let entry = occupied.get_mut();
                debug_assert_eq!(*entry.template, template, "blake3 collision");
                entry.refs += 1;
                Arc::clone(&entry.template)
            }
            MapEntry::Vacant(vacant) => {
                let shared = Arc::new(template);
                vacant.insert(Entry {
                    template: Arc::clone(&shared),
                    refs: 1,
                });
                shared
            }
        };
        self.references.fetch_add(1, Ordering::Relaxed);
        TemplateRef {
            registry: Arc::clone(self),
            id,
            template: shared,
        }
    }

    /// Takes another reference to a registered template, for callers that
    /// know only its id (a recorded or named template). `None` when no
    /// session holds it any more.
    pub fn acquire_id(self: &Arc<Self>, id: TemplateId) -> Option<TemplateRef> {
        let mut entry = self.templates.get_mut(&id)?;
        entry.refs += 1;
        let shared = Arc::clone(&entry.template);
        drop(entry);
        self.acquisitions.fetch_add(1, Ordering::Relaxed);
        self.dedup_hits.fetch_add(1, Ordering::Relaxed);
        self.references.fetch_add(1, Ordering::Relaxed);
        Some(TemplateRef {
            registry: Arc::clone(self),
            id,
            template: shared,
        })
    }

    /// The template with this id, without holding it registered.
    pub fn get(&self, id: TemplateId) -> Option<Arc<Template>> {
        self.templates
            .get(&id)
            .map(|entry| Arc::clone(&entry.template))
    }

    /// Distinct templates held now.
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            templates: self.templates.len(),
            references: self.references.load(Ordering::Relaxed),
            acquisitions: self.acquisitions.load(Ordering::Relaxed),
            dedup_hits: self.dedup_hits.load(Ordering::Relaxed),
        }
    }

    /// Adds a reference to an id that a live [`TemplateRef`] holds.
    fn retain(&self, id: TemplateId, template: &Arc<Template>) {
        // The entry exists while `template`'s holder lives; re-inserting it
        // if it were missing keeps the count right instead of panicking.
        self.templates
            .entry(id)
            .and_modify(|entry| entry.refs += 1)
            .or_insert_with(|| Entry {
                template: Arc::clone(template),
                refs: 1,
            });
        self.references.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops a reference; the last one removes the entry. The check and the
    /// removal happen under one shard lock, so a concurrent acquire of the
    /// same id either comes first (and the count stays above zero) or finds
    /// the entry gone and inserts a fresh one.
    fn release(&self, id: TemplateId) {
        if let MapEntry::Occupied(mut occupied) = self.templates.entry(id) {
            let entry = occupied.get_mut();
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                occupied.remove();
            }
        }
        self.references.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// A session's hold on a registered template. Cloning adds a reference;
/// dropping the last one frees the template.
pub struct TemplateRef {
    registry: Arc<Registry>,
    id: TemplateId,
    template: Arc<Template>,
}

impl TemplateRef {
    pub fn id(&self) -> TemplateId {
        self.id
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }
}

impl Clone for TemplateRef {
    fn clone(&self) -> Self {
        self.registry.retain(self.id, &self.template);
        TemplateRef {
            registry: Arc::clone(&self.registry),
            id: self.id,
            template: Arc::clone(&self.template),
        }
    }
}

impl Drop for TemplateRef {
    fn drop(&mut self) {
        self.registry.release(self.id);
    }
}

impl fmt::Debug for TemplateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TemplateRef").field(&self.id).finish()
    }
}
