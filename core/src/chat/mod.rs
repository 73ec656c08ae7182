//! Chat prompt encoding in the official DeepSeek-V4 format and parsing of completions
//! (reasoning, content, DSML tool calls).
