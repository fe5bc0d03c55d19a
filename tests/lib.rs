//! kstore's end-to-end tests live in this package's test targets (one binary per area);
//! this library is empty.
