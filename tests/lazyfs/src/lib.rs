//! LazyFS for Treaty: a FUSE filesystem that loses unsynced writes on a simulated power cut.
