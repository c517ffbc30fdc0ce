//! Request bodies, parsed field by field so that every refusal names the field and says what
//! was wrong with it (serde's derive errors name neither reliably). `null` counts as absent,
//! fields this server does not know are ignored (clients send `user`, `metadata`, …), and the
//! fields OpenAI defines but this server cannot honour are refused rather than ignored.

use serde_json::{Map, Value};

use ggpt::sampler::SamplerConfig;

use crate::error::ApiError;

/// Most strings in `stop` (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives in `logprobs` / `top_logprobs` for completions (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 5;
/// Chat allows up to 20 `top_logprobs`.
pub const MAX_CHAT_LOGPROBS: usize = 20;
/// Most choices per prompt.
pub const MAX_N: usize = 16;

/// The body as a JSON object; 400 for invalid UTF-8 (naming the byte offset), malformed JSON
/// (naming line and column) or a non-object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; expected a JSON object",
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// Typed access to the fields of a request object.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Fields { map }
    }

    /// The value of `key`, `None` if absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn wrong_type(key: &str, want: &str, v: &Value) -> ApiError {
        ApiError::invalid(key, format!("'{key}' must be {want}, got {}", type_name(v)))
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong_type(key, "a string", v)),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&'a str, ApiError> {
        self.str(key)?
            .ok_or_else(|| ApiError::invalid(key, format!("'{key}' is required")))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::wrong_type(key, "a boolean", v)),
        }
    }

    /// A number in `lo..=hi`.
    pub fn f64_in(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x >= lo && x <= hi {
                    Ok(Some(x))
                } else {
                    Err(ApiError::invalid(
                        key,
                        format!("'{key}' must be between {lo} and {hi}, got {n}"),
                    ))
                }
            }
            Some(v) => Err(Self::wrong_type(key, "a number", v)),
        }
    }

    /// An integer in `lo..=hi`.
    pub fn int_in(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(x) if x >= lo && x <= hi => Ok(Some(x)),
                Some(_) => Err(ApiError::invalid(
                    key,
                    format!("'{key}' must be an integer between {lo} and {hi}, got {n}"),
                )),
                None if n.as_u64().is_some() => Err(ApiError::invalid(
                    key,
                    format!("'{key}' must be an integer between {lo} and {hi}, got {n}"),
                )),
                None => Err(ApiError::invalid(
                    key,
                    format!("'{key}' must be an integer, got {n}"),
                )),
            },
            Some(v) => Err(Self::wrong_type(key, "an integer", v)),
        }
    }

    /// `seed`: any integer that fits 64 bits, negative ones taken as their two's complement.
    pub fn seed(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|x| x as u64))
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid(key, format!("'{key}' must be a 64-bit integer, got {n}"))
                }),
            Some(v) => Err(Self::wrong_type(key, "an integer", v)),
        }
    }

    /// Refuse a field this server does not implement, unless it holds its no-op value.
    pub fn refuse_unless(
        &self,
        key: &str,
        harmless: impl Fn(&Value) -> bool,
        why: &str,
    ) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !harmless(v) => Err(ApiError::invalid(key, format!("'{key}' {why}"))),
            _ => Ok(()),
        }
    }

    /// `stop`: a string or up to four non-empty strings.
    pub fn stop(&self) -> Result<Vec<String>, ApiError> {
        let stops = match self.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                if a.len() > MAX_STOP {
                    return Err(ApiError::invalid(
                        "stop",
                        format!(
                            "'stop' holds {} strings; at most {MAX_STOP} are allowed",
                            a.len()
                        ),
                    ));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s.clone()),
                        v => Err(ApiError::invalid(
                            format!("stop[{i}]"),
                            format!("'stop[{i}]' must be a string, got {}", type_name(v)),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(v) => {
                return Err(Self::wrong_type(
                    "stop",
                    "a string or an array of strings",
                    v,
                ))
            }
        };
        if stops.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid(
                "stop",
                "'stop' strings must not be empty",
            ));
        }
        Ok(stops)
    }

    /// The sampler's truncation settings, read the same way by every endpoint that samples:
    /// `temperature` in [0, 2] (default `default_temperature`), `top_p` in (0, 1] (default 1),
    /// `top_k` in [0, n_vocab] (0 = off), `min_p` in [0, 1] (default 0). The repeat penalty
    /// is off and the seed 0; an endpoint that reads those sets them.
    pub fn sampler(
        &self,
        n_vocab: usize,
        default_temperature: f32,
    ) -> Result<SamplerConfig, ApiError> {
        let temperature = self
            .f64_in("temperature", 0.0, 2.0)?
            .map_or(default_temperature, |t| t as f32);
        let top_p = self.f64_in("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        if top_p == 0.0 {
            return Err(ApiError::invalid("top_p", "'top_p' must be greater than 0"));
        }
        let top_k = self.int_in("top_k", 0, n_vocab as i64)?.unwrap_or(0) as usize;
        let min_p = self.f64_in("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32;
        Ok(SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        })
    }

    /// `logit_bias`: an object from token id (as a string) to a bias in [-100, 100].
    pub fn logit_bias(&self, n_vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let m = match self.get("logit_bias") {
            None => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(v) => return Err(Self::wrong_type("logit_bias", "an object", v)),
        };
        let mut out = Vec::with_capacity(m.len());
        for (k, v) in m {
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < n_vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("'logit_bias' key '{k}' is not a token id in 0..{n_vocab}"),
                    )
                })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("'logit_bias' value for token {id} must be a number in [-100, 100], got {v}"),
                    )
                })?;
            out.push((id, b as f32));
        }
        Ok(out)
    }
}

/// A prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// `prompt` / `input`: a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids. Ids are checked against the vocabulary.
pub fn prompts(key: &str, v: Option<&Value>, n_vocab: usize) -> Result<Vec<Prompt>, ApiError> {
    let v = v.ok_or_else(|| ApiError::invalid(key, format!("'{key}' is required")))?;
    let ids = |a: &Vec<Value>, at: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .filter(|&t| (t as usize) < n_vocab)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            at,
                            format!("'{at}[{i}]' = {x} is not a token id in 0..{n_vocab}"),
                        )
                    })
            })
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => {
            return Err(ApiError::invalid(key, format!("'{key}' must not be empty")))
        }
        Value::Array(a) => match &a[0] {
            Value::Number(_) => vec![Prompt::Tokens(ids(a, key)?)],
            Value::String(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    x => Err(ApiError::invalid(
                        format!("{key}[{i}]"),
                        format!("'{key}[{i}]' must be a string like the first element, got {}", type_name(x)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            Value::Array(_) => a
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(inner) => Ok(Prompt::Tokens(ids(inner, &format!("{key}[{i}]"))?)),
                    x => Err(ApiError::invalid(
                        format!("{key}[{i}]"),
                        format!("'{key}[{i}]' must be an array of token ids, got {}", type_name(x)),
                    )),
                })
                .collect::<Result<_, _>>()?,
            x => {
                return Err(ApiError::invalid(
                    key,
                    format!(
                        "'{key}' must be a string, an array of strings, an array of token ids or an array of arrays of token ids; its first element is {}",
                        type_name(x)
                    ),
                ))
            }
        },
        v => {
            return Err(ApiError::invalid(
                key,
                format!("'{key}' must be a string or an array, got {}", type_name(v)),
            ))
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn invalid_utf8_and_json_are_refused_with_where() {
        let e = parse_object(b"{\"a\": \"\xff\"}").unwrap_err();
        assert!(e.message.contains("offset 7"), "{}", e.message);
        let e = parse_object(b"{\"a\": ").unwrap_err();
        assert!(e.message.contains("line 1"), "{}", e.message);
        assert!(parse_object(b"[1]").is_err());
        assert!(parse_object(b"").is_err());
    }

    #[test]
    fn numbers_are_range_and_type_checked_with_the_field_named() {
        let m = obj(json!({"t": 3.5, "n": "2", "k": 1.5, "x": null}));
        let f = Fields::new(&m);
        let e = f.f64_in("t", 0.0, 2.0).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("t"));
        assert!(e.message.contains("between 0 and 2"));
        let e = f.int_in("n", 1, 4).unwrap_err();
        assert!(
            e.message.contains("must be an integer, got a string"),
            "{}",
            e.message
        );
        assert!(f.int_in("k", 0, 5).is_err());
        assert_eq!(f.int_in("x", 0, 5).unwrap(), None);
        assert_eq!(f.int_in("absent", 0, 5).unwrap(), None);
    }

    #[test]
    fn prompts_in_every_shape() {
        let v = 100;
        assert_eq!(
            prompts("prompt", Some(&json!("hi")), v).unwrap(),
            [Prompt::Text("hi".into())]
        );
        assert_eq!(
            prompts("prompt", Some(&json!([1, 2])), v).unwrap(),
            [Prompt::Tokens(vec![1, 2])]
        );
        assert_eq!(
            prompts("prompt", Some(&json!([[1], [3, 4]])), v).unwrap(),
            [Prompt::Tokens(vec![1]), Prompt::Tokens(vec![3, 4])]
        );
        assert_eq!(
            prompts("prompt", Some(&json!(["a", "b"])), v)
                .unwrap()
                .len(),
            2
        );
        let e = prompts("prompt", Some(&json!([1, 100])), v).unwrap_err();
        assert!(e.message.contains("'prompt[1]' = 100"), "{}", e.message);
        assert!(prompts("prompt", Some(&json!(["a", 1])), v).is_err());
        assert!(prompts("prompt", Some(&json!([])), v).is_err());
        assert!(prompts("prompt", None, v).is_err());
    }

    #[test]
    fn stop_and_logit_bias_limits() {
        let m = obj(json!({"stop": ["a", "b", "c", "d", "e"]}));
        assert!(Fields::new(&m)
            .stop()
            .unwrap_err()
            .message
            .contains("at most 4"));
        let m = obj(json!({"stop": "\n"}));
        assert_eq!(Fields::new(&m).stop().unwrap(), ["\n"]);
        let m = obj(json!({"logit_bias": {"5": 10, "7": -100}}));
        let mut b = Fields::new(&m).logit_bias(10).unwrap();
        b.sort_by_key(|x| x.0);
        assert_eq!(b, [(5, 10.0), (7, -100.0)]);
        let m = obj(json!({"logit_bias": {"50": 1}}));
        assert!(Fields::new(&m).logit_bias(10).is_err());
        let m = obj(json!({"logit_bias": {"5": 101}}));
        assert!(Fields::new(&m).logit_bias(10).is_err());
    }
}
