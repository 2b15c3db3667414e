// burn's flex backend allocates a fresh buffer for nearly every tensor op; with glibc's malloc
// large buffers come straight from mmap and every step pays page faults and zeroing for them.
// mimalloc reuses freed blocks; whether it also keeps idle pages from the kernel between steps
// is `train.keep_freed_memory` (src/memory/allocator.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(kiln::cli::main());
}
