//! What the allocator does with freed memory (`train.keep_freed_memory`).
//!
//! burn's CPU backend allocates a fresh buffer for nearly every tensor op, and a step frees
//! and reallocates the same activations each time. By default mimalloc, kiln's allocator,
//! hands freed memory back to the kernel once it has been idle for a second (its v3
//! default); a step takes longer than that, so the next step's tensors fault those pages in
//! again, and the kernel zeroes each one. Keeping freed memory (mimalloc's
//! `purge_delay = -1`, the behaviour of PyTorch's CUDA caching allocator) takes that work out
//! of every step, at the price that the resident set never shrinks: it stays at the run's
//! high-water mark, so every phase's peak reads as that mark.
//!
//! Only the `kiln` binary allocates through mimalloc; in a program that links kiln as a
//! library (the tests) the setting changes nothing but is harmless.

/// mimalloc's option index of `purge_delay` (`mi_option_purge_delay` in mimalloc.h; the same in
/// its v2 and v3 headers; libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's default purge delay, ms (v3: 1000; `MIMALLOC_PURGE_DELAY` overrides it), read
/// before kiln first changes it.
static DEFAULT_PURGE_DELAY_MS: std::sync::OnceLock<std::ffi::c_long> = std::sync::OnceLock::new();

/// Keep freed memory for reuse (`true`) or hand it back to the kernel after mimalloc's default
/// delay (`false`). Process-wide; the last call wins (ranks of one process share the setting).
pub fn keep_freed_pages(keep: bool) {
    // SAFETY: reads and sets one integer option; mimalloc reads it when it next decides to purge.
    unsafe {
        let default = *DEFAULT_PURGE_DELAY_MS
            .get_or_init(|| libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY));
        let delay = if keep { -1 } else { default };
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay)
    }
}

/// Minor page faults of this process so far: pages the kernel mapped in (and zeroed) because
/// the process touched them for the first time. 0 if unknown.
pub fn minor_page_faults() -> u64 {
    // SAFETY: getrusage writes one plain struct that lives on this frame.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) == 0 {
            usage.ru_minflt.max(0) as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_index_is_purge_delay() {
        // SAFETY: reads one integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        // Index 15 holds purge_delay's documented v3 default (no neighbour's is 1000), unless
        // the environment overrides it.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 1000);
        }
        let default = get();
        keep_freed_pages(true);
        assert_eq!(get(), -1);
        keep_freed_pages(false);
        assert_eq!(get(), default);
    }

    #[test]
    fn touching_fresh_memory_counts_faults() {
        let before = minor_page_faults();
        let mut v = vec![0u8; 64 << 20];
        for page in v.chunks_mut(4096) {
            page[0] = 1;
        }
        assert!(minor_page_faults() >= before + 1000, "{before}");
        drop(v);
    }
}
