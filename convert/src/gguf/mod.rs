//! GGUF v2/v3: a validating reader that borrows an mmapped file and a streaming writer.
//! (H3 owns this module.)
