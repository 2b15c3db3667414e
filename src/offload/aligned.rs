//! Page-aligned f32 buffers: O_DIRECT transfers need the memory, the file offset and the length
//! aligned to the device's logical block, and 4 KiB covers every device in use.

use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Alignment of buffers, file offsets and transfer lengths.
pub const ALIGN: usize = 4096;

/// A zeroed, `ALIGN`-aligned buffer of f32.
pub struct AlignedBuf {
    ptr: *mut f32,
    len: usize,
}

// The buffer owns its allocation exclusively, like a Vec.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed floats; `len * 4` must be a multiple of `ALIGN`.
    pub fn zeroed(len: usize) -> Self {
        assert!(len > 0 && (len * 4) % ALIGN == 0, "unaligned buffer length");
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) } as *mut f32;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len * 4, ALIGN).expect("valid layout")
    }

    /// The floats.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: `ptr` holds `len` initialised floats owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The bytes, for I/O.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as above; any f32 bit pattern is valid bytes.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len * 4) }
    }

    /// The bytes, for reading into.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; any byte pattern is a valid f32.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len * 4) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr as *mut u8, Self::layout(self.len)) }
    }
}
