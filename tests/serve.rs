//! `hayloft serve` over HTTP: every endpoint's shape, SSE framing, echo log-probabilities against a session's own
//! log-softmax, each error's status and JSON (and the server still serving after it), concurrency, the full queue's
//! 429, client disconnects, /health while loading; the real `openai` Python client when a Python with it is given
//! (HAYLOFT_TEST_PYTHON, set by .ci/run); one chat on the real SmolLM2.
//!
//! The client is a few lines over a TcpStream (HTTP/1.1, `Connection: close`), so the tests need no HTTP crate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hayloft::engine::prefix::StoreConfig;
use hayloft::engine::{Lengths, Session, SessionConfig};
use hayloft::gguf::Value as GgufValue;
use hayloft::model::testutil::{tiny_llama, write_tiny_llama, TinySpec};
use hayloft::model::Model;
use hayloft::serve::{ServeConfig, ServeModel, Server};
use serde_json::{json, Value};

mod common;

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The SSE events' data, checking the framing: every event is `data: <payload>` and ends in a blank line.
    fn sse(&self) -> Vec<String> {
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "not SSE: {:?}",
            self.headers
        );
        assert!(self.body.ends_with("\n\n"), "unterminated: {:?}", self.body);
        self.body
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).unwrap();
    s
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut s = send(addr, method, path, body, headers);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn parse(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("no header end");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            return out;
        }
        out += &rest[..n];
        s = &rest[n + 2..];
    }
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    http(addr, "POST", path, Some(&body.to_string()), &[])
}

fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, None, &[])
}

/// A tiny random-weight Llama in a temp dir, served.
struct Tiny {
    server: Server,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn tiny(spec: &TinySpec, cfg: ServeConfig) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, spec).unwrap();
    serve_tiny(dir, path, cfg)
}

/// A tiny model whose GGUF carries `template` as its chat template.
fn tiny_with_template(spec: &TinySpec, template: &str) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut w = tiny_llama(spec);
    w.set_meta(
        "tokenizer.chat_template",
        GgufValue::String(template.into()),
    );
    w.write(&path).unwrap();
    serve_tiny(dir, path, ServeConfig::default())
}

fn serve_tiny(dir: tempfile::TempDir, path: PathBuf, cfg: ServeConfig) -> Tiny {
    let p = path.clone();
    let server = Server::start(
        ServeConfig { port: 0, ..cfg },
        Box::new(move || ServeModel::open(&p)),
    )
    .unwrap();
    server.wait_loaded().unwrap();
    Tiny {
        server,
        path,
        _dir: dir,
    }
}

fn small() -> Tiny {
    tiny(&TinySpec::default(), ServeConfig::default())
}

/// A tiny model big enough that a few thousand tokens take seconds: for tests that need a sequence still running.
fn slow_spec() -> TinySpec {
    TinySpec {
        n_layers: 4,
        dim: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn_dim: 768,
        ctx_len: 4096,
        ..Default::default()
    }
}

/// Sets each field of `extra` (a JSON object) in a request body.
fn merge(body: &mut Value, extra: &Value) {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
}

fn assert_error(r: &Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let j = r.json();
    let msg = j["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message: {j}"));
    assert!(j["error"]["type"].is_string(), "{j}");
    assert!(j["error"].get("code").is_some(), "{j}");
    assert!(msg.contains(needle), "'{msg}' does not mention '{needle}'");
}

fn greedy(prompt: Value, max_tokens: usize) -> Value {
    json!({"model": "anything", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn endpoints_answer_in_openai_shapes() {
    let t = small();
    let a = t.server.addr;
    assert_eq!(get(a, "/health").json(), json!({"status": "ok"}));
    let m = get(a, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["object"], "model");

    let info = get(a, "/tokenizer_info").json();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
    // lm-eval's remote tokenizer: the EOS text encodes to the EOS id; tokenize and detokenize round-trip.
    let eos = post(
        a,
        "/tokenize",
        &json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
    )
    .json();
    assert_eq!(eos["tokens"], json!([info["eos_token_id"]]));
    let toks = post(
        a,
        "/tokenize",
        &json!({"prompt": "the thin hen", "add_special_tokens": false}),
    )
    .json();
    let ids = toks["tokens"].clone();
    assert_eq!(toks["count"], ids.as_array().unwrap().len());
    let back = post(a, "/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(back["prompt"], "the thin hen");
    let chat_ids = post(
        a,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .json();
    assert!(chat_ids["count"].as_u64().unwrap() > 3);

    let r = post(a, "/v1/completions", &greedy(json!("the hen"), 5));
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], "anything");
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    let ch = &c["choices"][0];
    assert_eq!(ch["index"], 0);
    assert!(ch["text"].is_string());
    assert!(ch["logprobs"].is_null());
    let u = &c["usage"];
    let n_prompt = post(a, "/tokenize", &json!({"prompt": "the hen"})).json()["count"].clone();
    assert_eq!(u["prompt_tokens"], n_prompt);
    let gen = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&gen));
    assert_eq!(
        ch["finish_reason"],
        if gen == 5 { "length" } else { "stop" }
    );
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(n_prompt.as_u64().unwrap() + gen)
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);

    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    assert!(c["choices"][0]["message"]["content"].is_string());
    let lp = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        c["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(lp[0]["logprob"].as_f64().unwrap() <= 0.0);

    // logit_bias: +100 forces a token at every step, -100 bans the one greedy picks; the penalties are taken.
    let forced = post(
        a,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": true,
                "logit_bias": {"42": 100}}),
    );
    assert_eq!(forced.status, 200, "{}", forced.body);
    let want = post(a, "/detokenize", &json!({"tokens": [42, 42, 42]})).json();
    assert_eq!(forced.json()["choices"][0]["text"], want["prompt"]);
    // Of 42 and 43 both raised by 100, greedy takes the one the model prefers; banning it (-100) leaves the other.
    let first = |bias: Value| {
        let r = post(
            a,
            "/v1/completions",
            &json!({"prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0, "ignore_eos": true,
                    "logit_bias": bias, "presence_penalty": 0.5, "frequency_penalty": -0.5}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["text"].clone()
    };
    let text =
        |id: u32| post(a, "/detokenize", &json!({ "tokens": [id] })).json()["prompt"].clone();
    let (t42, t43) = (text(42), text(43));
    assert_ne!(t42, t43);
    let both = first(json!({"42": 100, "43": 100}));
    let (won, other, other_text) = if both == t42 {
        (42, 43, &t43)
    } else {
        (43, 42, &t42)
    };
    assert!(
        both == t42 || both == t43,
        "{both} is neither token 42 nor 43"
    );
    let banned = first(json!({ won.to_string(): -100, other.to_string(): 100 }));
    assert_eq!(&banned, other_text, "token {won} was banned");

    // A batch of prompts (text and ids) × n: choices in order, each prompt counted once in usage.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2, "n": 2,
                                               "temperature": 0, "ignore_eos": true}),
    );
    let c = r.json();
    let ch = c["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 4, "{c}");
    for (i, x) in ch.iter().enumerate() {
        assert_eq!(x["index"], i);
    }
    assert_eq!(
        ch[0]["text"], ch[1]["text"],
        "greedy choices of one prompt agree"
    );
    assert_eq!(c["usage"]["prompt_tokens"], 5);
    assert_eq!(c["usage"]["completion_tokens"], 8);

    let metrics = get(a, "/metrics");
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    for name in [
        "hayloft_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "hayloft_prompt_tokens_total",
        "hayloft_generated_tokens_total",
        "hayloft_time_to_first_token_seconds_bucket",
        "hayloft_inter_token_latency_seconds_count",
        "hayloft_kv_cache_bytes",
        "hayloft_requests_waiting",
    ] {
        assert!(
            metrics.body.contains(name),
            "no {name} in\n{}",
            metrics.body
        );
    }
}

/// log-softmax of every prompt position, straight from a session: what echo's log-probabilities must equal.
fn session_logprobs(model_path: &Path, ids: &[u32]) -> Vec<Vec<f64>> {
    let model = Model::load(model_path).unwrap();
    let mut s = Session::new(&model, SessionConfig::for_model(&model)).unwrap();
    let mut rows = Vec::new();
    s.feed(ids, 0..ids.len(), |_, l| {
        let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z: f64 = l.iter().map(|&x| (x as f64 - m).exp()).sum();
        rows.push(l.iter().map(|&x| x as f64 - m - z.ln()).collect());
    })
    .unwrap();
    rows
}

#[test]
fn echo_logprobs_equal_the_sessions_log_softmax() {
    let t = small();
    let ids: Vec<u32> = vec![17, 200, 33, 90, 4, 150, 61];
    let rows = session_logprobs(&t.path, &ids);
    // lm-eval's log-likelihood request: the echoed prompt and exactly one generated token.
    let r = post(
        t.server.addr,
        "/v1/completions",
        &json!({"model": "x", "prompt": [ids.clone()], "max_tokens": 1,
        "temperature": 0, "logprobs": 3, "seed": 1234, "echo": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = &r.json()["choices"][0]["logprobs"];
    let tl = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(
        tl.len(),
        ids.len() + 1,
        "prompt + one generated token: {lp}"
    );
    assert!(tl[0].is_null());
    for i in 1..ids.len() {
        let want = rows[i - 1][ids[i] as usize];
        let got = tl[i].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "position {i}: {got} vs {want}");
        // The top alternatives: 3 of them, the argmax among them with its log-probability.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        let best = rows[i - 1]
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let top_best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (top_best - best).abs() < 1e-4,
            "position {i}: top {top_best} vs argmax {best}"
        );
    }
    // The generated token is the argmax after the prompt (greedy), with its log-probability.
    let last = rows[ids.len() - 1].clone();
    let best = last.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert!((tl[ids.len()].as_f64().unwrap() - best).abs() < 1e-4);
    assert_eq!(lp["tokens"].as_array().unwrap().len(), ids.len() + 1);
    let offs = lp["text_offset"].as_array().unwrap();
    assert!(offs.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));

    // The older request shape: max_tokens 0, only the prompt.
    let r = post(
        t.server.addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 0, "echo": true,
        "logprobs": 0}),
    );
    let c = r.json();
    assert_eq!(
        c["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        ids.len()
    );
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 0);
}

/// A text prompt on a model that asks for BOS: the server puts BOS in front, and the echo leaves it out, so the echoed
/// tokens spell the text sent and line up with `/tokenize` without special tokens (lm-eval's `tokenized_requests=False`
/// slices `token_logprobs[ctxlen:-1]` with that count). The first echoed token has a log-probability (given BOS).
#[test]
fn echo_of_a_text_prompt_leaves_out_the_bos_the_server_added() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bos.gguf");
    tiny_llama(&TinySpec::default())
        .set_meta("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))
        .write(&path)
        .unwrap();
    let p = path.clone();
    let server = Server::start(
        ServeConfig {
            port: 0,
            ..ServeConfig::default()
        },
        Box::new(move || ServeModel::open(&p)),
    )
    .unwrap();
    server.wait_loaded().unwrap();
    let a = server.addr;
    let text = "the thin cat";
    let tok = post(
        a,
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    )
    .json();
    let plain: Vec<u32> = tok["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let bos = get(a, "/tokenizer_info").json()["bos_token_id"]
        .as_u64()
        .unwrap() as u32;
    let mut with_bos = vec![bos];
    with_bos.extend(&plain);
    let rows = session_logprobs(&path, &with_bos);
    for stream in [false, true] {
        let body = json!({"prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": true,
                          "stream": stream});
        let r = post(a, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        // The streamed echo comes in the first frame; the plain answer holds it with the generated token.
        let lp = if stream {
            let first: Value = serde_json::from_str(&r.sse()[0]).unwrap();
            first["choices"][0]["logprobs"].clone()
        } else {
            let j = r.json();
            assert_eq!(
                j["usage"]["prompt_tokens"],
                plain.len() + 1,
                "BOS is still counted: {j}"
            );
            j["choices"][0]["logprobs"].clone()
        };
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(
            tokens.concat().starts_with(text) && tokens.len() >= plain.len(),
            "stream {stream}: {tokens:?}"
        );
        assert_eq!(tokens[..plain.len()].concat(), text, "stream {stream}");
        let tl = lp["token_logprobs"].as_array().unwrap();
        for (i, &id) in plain.iter().enumerate() {
            // Echo position i is the text's token i, at position i + 1 after BOS.
            let want = rows[i][id as usize];
            let got = tl[i].as_f64().unwrap_or_else(|| {
                panic!("stream {stream}: position {i} has no log-probability: {lp}")
            });
            assert!(
                (got - want).abs() < 1e-4,
                "stream {stream} position {i}: {got} vs {want}"
            );
        }
        let offs: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(offs[0], 0);
        assert_eq!(
            offs[plain.len() - 1] as usize + tokens[plain.len() - 1].len(),
            text.len()
        );
    }
    // Token-id prompts are echoed as sent: no BOS added, none left out.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": [plain.clone()], "max_tokens": 1, "logprobs": 1, "echo": true}),
    );
    let tl = r.json()["choices"][0]["logprobs"]["token_logprobs"].clone();
    assert_eq!(tl.as_array().unwrap().len(), plain.len() + 1);
    assert!(tl[0].is_null());
}

#[test]
fn streams_are_sse_frames_that_add_up_to_the_plain_answer() {
    let t = small();
    let a = t.server.addr;
    let plain = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the hen", "max_tokens": 12, "temperature": 0,
                                                   "ignore_eos": true}),
    )
    .json();
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the hen", "max_tokens": 12, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(r.status, 200);
    let events = r.sse();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], plain["usage"]);
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");

    // Chat: a role delta first, content deltas, a finish chunk; no usage chunk unless asked.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
                      "ignore_eos": true});
    let plain = post(a, "/v1/chat/completions", &body).json();
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let events = post(a, "/v1/chat/completions", &sb).sse();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn stop_strings_cut_the_text_and_finish_with_stop() {
    let t = small();
    let a = t.server.addr;
    let full = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "max_tokens": 40, "temperature": 0,
                                                  "ignore_eos": true}),
    )
    .json();
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the greedy text (by characters: the text may not be ASCII).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "greedy text too short: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let r = post(
            a,
            "/v1/completions",
            &json!({"prompt": "the", "max_tokens": 40, "temperature": 0,
            "ignore_eos": true, "stop": [stop.clone(), "\u{1F600}never"], "stream": stream}),
        );
        let (got, finish) = if stream {
            let ev = r.sse();
            let chunks: Vec<Value> = ev[..ev.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).unwrap())
                .collect();
            let t: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["text"].as_str())
                .collect();
            (
                t,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let c = r.json();
            (
                c["choices"][0]["text"].as_str().unwrap().to_string(),
                c["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(got, cut, "stream {stream}");
        assert_eq!(finish, "stop");
    }
}

#[test]
fn stop_token_ids_end_the_answer_and_min_tokens_holds_off_every_end() {
    let t = small();
    let a = t.server.addr;
    // Token 120 is the byte 'x': a bias of 100 makes the tiny model's greedy answer that token whenever it may.
    let x = 120;
    let text_x = post(a, "/detokenize", &json!({"tokens": [x]})).json()["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(text_x, "x");
    let eos = get(a, "/tokenizer_info").json()["eos_token_id"]
        .as_u64()
        .unwrap();
    let ask = |extra: Value, stream: bool| {
        let mut body =
            json!({"prompt": [5, 6, 7], "max_tokens": 10, "temperature": 0, "stream": stream});
        merge(&mut body, &extra);
        let r = post(a, "/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };
    let usage = |r: &Resp| r.json()["usage"]["completion_tokens"].as_u64().unwrap();
    for stream in [false, true] {
        // A stop token that is text ends the answer after its text.
        let r = ask(
            json!({"logit_bias": {"120": 100}, "stop_token_ids": [x], "ignore_eos": true}),
            stream,
        );
        assert_eq!(choice_text(&r, stream, 0), ("x".to_string(), json!("stop")));
        // min_tokens: the stop token is never drawn before it; its first draw after ends the answer.
        let r = ask(
            json!({"logit_bias": {"120": 100}, "stop_token_ids": [x], "min_tokens": 4, "ignore_eos": true}),
            stream,
        );
        let (text, finish) = choice_text(&r, stream, 0);
        assert_eq!(finish, "stop", "{text:?}");
        assert!(
            text.ends_with('x') && !text[..text.len() - 1].contains('x'),
            "{text:?}"
        );
        if !stream {
            assert_eq!(usage(&r), 5);
        }
        // Stop strings are matched only from the min_tokens-th token on.
        let r = ask(
            json!({"logit_bias": {"120": 100}, "stop": ["x"], "ignore_eos": true}),
            stream,
        );
        assert_eq!(choice_text(&r, stream, 0), (String::new(), json!("stop")));
        let r = ask(
            json!({"logit_bias": {"120": 100}, "stop": ["x"], "min_tokens": 3, "ignore_eos": true}),
            stream,
        );
        assert_eq!(
            choice_text(&r, stream, 0),
            ("xx".to_string(), json!("stop"))
        );
    }
    // End of generation: with a bias it comes first; min_tokens holds it off for as many draws.
    let bias = json!({ eos.to_string(): 100 });
    let r = ask(json!({"logit_bias": bias}), false);
    assert_eq!(
        (usage(&r), r.json()["choices"][0]["finish_reason"].clone()),
        (1, json!("stop"))
    );
    let r = ask(json!({"logit_bias": bias, "min_tokens": 6}), false);
    assert_eq!(
        (usage(&r), r.json()["choices"][0]["finish_reason"].clone()),
        (7, json!("stop"))
    );
    // With ignore_eos it never ends early, and min_tokens changes nothing.
    let r = ask(
        json!({"logit_bias": bias, "min_tokens": 6, "ignore_eos": true}),
        false,
    );
    assert_eq!(
        (usage(&r), r.json()["choices"][0]["finish_reason"].clone()),
        (10, json!("length"))
    );
    // Refused: a stop token outside the vocabulary, min_tokens over max_tokens, min_tokens in JSON mode.
    let bad = |body: Value, needle: &str| {
        assert_error(&post(a, "/v1/completions", &body), 400, needle);
        assert_error(
            &post(
                a,
                "/v1/chat/completions",
                &json!({
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": body["max_tokens"], "stop_token_ids": body["stop_token_ids"],
            "min_tokens": body["min_tokens"], "response_format": body["response_format"]}),
            ),
            400,
            needle,
        );
    };
    bad(
        json!({"prompt": "a", "max_tokens": 4, "stop_token_ids": [1 << 30]}),
        "stop_token_ids",
    );
    bad(
        json!({"prompt": "a", "max_tokens": 4, "min_tokens": 5}),
        "min_tokens",
    );
    bad(
        json!({"prompt": "a", "max_tokens": 4, "min_tokens": 2, "response_format": {"type": "json_object"}}),
        "min_tokens",
    );
    // The server still answers.
    assert_eq!(ask(json!({}), false).json()["choices"][0]["index"], 0);
}

/// The text of choice `i` and its finish reason, from a plain or a streamed answer of either endpoint.
fn choice_text(r: &Resp, stream: bool, i: usize) -> (String, Value) {
    let pick = |c: &Value| {
        let ch = &c["choices"][0];
        let t = ch["text"]
            .as_str()
            .or(ch["message"]["content"].as_str())
            .or(ch["delta"]["content"].as_str());
        (t.map(str::to_string), ch["finish_reason"].clone())
    };
    if !stream {
        let c = r.json();
        let ch = &c["choices"][i];
        let t = ch["text"].as_str().or(ch["message"]["content"].as_str());
        return (t.unwrap().to_string(), ch["finish_reason"].clone());
    }
    let ev = r.sse();
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| c["choices"][0]["index"] == i)
        .collect();
    let text = chunks.iter().filter_map(|c| pick(c).0).collect();
    (text, pick(chunks.last().unwrap()).1)
}

#[test]
fn json_mode_keeps_the_text_a_json_object_and_ends_with_it() {
    let t = small();
    let a = t.server.addr;
    // Byte tokens: '}' is 125, 'x' 120. Pushed up by 100, 'x' still never comes (no JSON object holds a bare x),
    // and '}' closes the object as soon as it may: the answer is "{}" after at most some whitespace.
    let bias = json!({"125": 100, "120": 100});
    for (path, stream) in [
        ("/v1/completions", false),
        ("/v1/completions", true),
        ("/v1/chat/completions", false),
        ("/v1/chat/completions", true),
    ] {
        let mut body = json!({"max_tokens": 40, "temperature": 0, "logit_bias": bias,
            "response_format": {"type": "json_object"}, "stream": stream});
        if path == "/v1/completions" {
            body["prompt"] = json!("the");
        } else {
            body["messages"] = json!([{"role": "user", "content": "the"}]);
        }
        let r = post(a, path, &body);
        assert_eq!(r.status, 200, "{}", r.body);
        let (text, finish) = choice_text(&r, stream, 0);
        assert_eq!(text.trim_start(), "{}", "{path} stream {stream}");
        assert_eq!(finish, "stop", "{path} stream {stream}: {text:?}");
    }
    // Sampled, several choices: every text is the beginning of a JSON object, and one that stopped is a whole one.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "max_tokens": 48, "temperature": 1.0, "top_k": 0, "n": 6,
            "seed": 7, "ignore_eos": true, "response_format": {"type": "json_object"}}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for i in 0..6 {
        let (text, finish) = choice_text(&r, false, i);
        let mut s = hayloft::engine::json::JsonState::new();
        assert!(
            text.bytes().all(|b| s.step(b)),
            "choice {i} is not the beginning of a JSON object: {text:?}"
        );
        if finish == "stop" {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(v.is_object(), "{text:?}");
        } else {
            assert_eq!(finish, "length", "{text:?}");
            assert!(!s.done(), "{text:?}");
        }
    }
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "response_format": {"type": "xml"}}),
    );
    assert_error(&r, 400, "json_object");
}

#[test]
fn json_schema_mode_answers_what_the_schema_accepts_keys_in_its_order() {
    let t = small();
    let a = t.server.addr;
    // Written as text: the keys' order ("ok" before "n") is the schema's, and `json!` would sort them.
    let body = r#"{"prompt": "the", "max_tokens": 400, "temperature": 1.0, "top_k": 0, "n": 4, "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "strict": true, "schema":
        {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
         "tag": {"enum": ["x", "y"]}}, "required": ["ok", "n"], "additionalProperties": false}}}}"#;
    let r = http(a, "POST", "/v1/completions", Some(body), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    for i in 0..4 {
        let (text, finish) = choice_text(&r, false, i);
        assert_eq!(finish, "stop", "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["ok"].is_boolean(), "{text}");
        assert!(
            v["n"].is_number() && !v["n"].to_string().contains('.'),
            "{text}"
        );
        assert!(v.get("tag").is_none_or(|t| t == "x" || t == "y"), "{text}");
        assert_eq!(
            v.as_object().unwrap().len(),
            2 + v.get("tag").is_some() as usize,
            "{text}"
        );
        assert!(
            text.find("\"ok\"") < text.find("\"n\""),
            "keys out of order: {text}"
        );
    }
    // What the schema support does not cover is refused by name.
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
            "json_schema": {"schema": {"type": "string", "pattern": "^a"}}}}),
    );
    assert_error(&r, 400, "pattern");
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "response_format": {"type": "json_schema"}}),
    );
    assert_error(&r, 400, "json_schema.schema");
}

#[test]
fn errors_get_status_and_openai_json_and_the_server_keeps_serving() {
    let t = small();
    let a = t.server.addr;
    let ok = |a| {
        let r = post(a, "/v1/completions", &greedy(json!("the"), 2));
        assert_eq!(r.status, 200, "after an error: {}", r.body);
    };
    let r = http(
        a,
        "POST",
        "/v1/completions",
        Some("{\"prompt\": \"x\","),
        &[],
    );
    assert_error(&r, 400, "malformed JSON");
    ok(a);
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "x", "temperature": "hot"}),
    );
    assert_error(&r, 400, "temperature");
    ok(a);
    let r = post(a, "/v1/completions", &json!({"prompt": {"no": 1}}));
    assert_error(&r, 400, "prompt");
    let r = post(a, "/v1/completions", &json!({"max_tokens": 3}));
    assert_error(&r, 400, "prompt");
    let r = post(a, "/v1/completions", &json!({"prompt": [1, 2, 99999]}));
    assert_error(&r, 400, "99999");
    let long: Vec<u32> = vec![5; 600];
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 0}),
    );
    assert_error(&r, 400, "context");
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    ok(a);
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "max_tokens": 100000}),
    );
    assert_error(&r, 400, "max_tokens");
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "kv": "snapkvv@0.5"}),
    );
    assert_error(&r, 400, "snapkvv");
    assert_eq!(r.json()["error"]["code"], "invalid_kv");
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the", "top_p": 3.0}),
    );
    assert_error(&r, 400, "top_p");
    let r = post(a, "/v1/completions", &json!({"prompt": "the", "n": 0}));
    assert_error(&r, 400, "n");
    let r = post(a, "/v1/chat/completions", &json!({"messages": []}));
    assert_error(&r, 400, "messages");
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user"}], "frequency_penalty": 3}),
    );
    assert_error(&r, 400, "frequency_penalty");
    for (path, extra, field) in [
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        ("/v1/completions", json!({"suffix": "end"}), "suffix"),
        ("/v1/completions", json!({"best_of": 3}), "best_of"),
    ] {
        let mut body = if path == "/v1/completions" {
            json!({"prompt": "the", "max_tokens": 1})
        } else {
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        };
        merge(&mut body, &extra);
        assert_error(&post(a, path, &body), 400, field);
        // The neutral value passes.
        let neutral = match field {
            "response_format" => json!({"type": "text"}),
            "tools" => json!([]),
            "suffix" => json!(""),
            _ => json!(1),
        };
        body[field] = neutral;
        let r = post(a, path, &body);
        assert_eq!(r.status, 200, "{field}: {}", r.body);
    }
    for (bias, needle) in [
        (json!({"abc": 1}), "logit_bias"),
        (json!({"5": 101}), "-100 to 100"),
        (json!({"99999999": 1}), "logit_bias"),
        (json!([1, 2]), "logit_bias"),
    ] {
        let r = post(
            a,
            "/v1/completions",
            &json!({"prompt": "the", "logit_bias": bias}),
        );
        assert_error(&r, 400, needle);
    }
    let r = get(a, "/v2/nothing");
    assert_error(&r, 404, "/v2/nothing");
    ok(a);
    // A KV method that parses, run by the request.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "the thin hen", "max_tokens": 3, "kv": "window@0.5",
                                               "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let m = get(a, "/metrics").body;
    assert!(m.contains("status=\"400\""), "{m}");
}

#[test]
fn api_key_is_required_except_for_health() {
    let t = tiny(
        &TinySpec::default(),
        ServeConfig {
            api_key: Some("s3cret".into()),
            ..Default::default()
        },
    );
    let a = t.server.addr;
    let body = greedy(json!("the"), 2).to_string();
    let r = http(a, "POST", "/v1/completions", Some(&body), &[]);
    assert_error(&r, 401, "API key");
    let r = http(
        a,
        "POST",
        "/v1/completions",
        Some(&body),
        &[("Authorization", "Bearer wrong!")],
    );
    assert_error(&r, 401, "API key");
    let r = http(
        a,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(r.status, 200);
    let r = http(
        a,
        "POST",
        "/v1/completions",
        Some(&body),
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(get(a, "/health").status, 200);
    // No CORS headers unless asked for.
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn health_is_503_while_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, &TinySpec::default()).unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let server = Server::start(
        ServeConfig {
            port: 0,
            ..Default::default()
        },
        Box::new(move || {
            let _ = go_rx.recv();
            ServeModel::open(&path)
        }),
    )
    .unwrap();
    let a = server.addr;
    let r = get(a, "/health");
    assert_error(&r, 503, "loading");
    assert!(r.header("retry-after").is_some());
    assert_error(
        &post(a, "/v1/completions", &greedy(json!("x"), 1)),
        503,
        "loading",
    );
    go_tx.send(()).unwrap();
    server.wait_loaded().unwrap();
    assert_eq!(get(a, "/health").status, 200);
}

#[test]
fn concurrent_requests_are_all_answered_as_if_alone() {
    let t = tiny(
        &TinySpec::default(),
        ServeConfig {
            parallel: 3,
            queue: 32,
            ..Default::default()
        },
    );
    let a = t.server.addr;
    let prompts: Vec<String> = (0..10)
        .map(|i| format!("the hen {i} in the thin"))
        .collect();
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            post(
                a,
                "/v1/completions",
                &json!({"prompt": p, "max_tokens": 20, "temperature": 0,
                                                    "ignore_eos": true}),
            )
            .json()
        })
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.clone();
            std::thread::spawn(move || {
                let stream = i % 2 == 1;
                let r = post(
                    a,
                    "/v1/completions",
                    &json!({"prompt": p, "max_tokens": 20, "temperature": 0,
                                                           "ignore_eos": true, "stream": stream}),
                );
                assert_eq!(r.status, 200, "{}", r.body);
                if stream {
                    let ev = r.sse();
                    ev[..ev.len() - 1]
                        .iter()
                        .filter_map(|e| {
                            let v: Value = serde_json::from_str(e).unwrap();
                            v["choices"][0]["text"].as_str().map(str::to_string)
                        })
                        .collect::<String>()
                } else {
                    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
                }
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&alone) {
        assert_eq!(
            h.join().unwrap(),
            want["choices"][0]["text"].as_str().unwrap()
        );
    }
}

/// Polls /metrics until `pred` holds (5 s at most).
fn wait_metrics(a: SocketAddr, pred: impl Fn(&str) -> bool, what: &str) {
    let t0 = Instant::now();
    loop {
        let m = get(a, "/metrics").body;
        if pred(&m) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(m: &str, name: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn a_full_queue_answers_429_and_a_disconnect_frees_the_slot() {
    let t = tiny(
        &slow_spec(),
        ServeConfig {
            parallel: 1,
            queue: 0,
            ..Default::default()
        },
    );
    let a = t.server.addr;
    let long = json!({"prompt": "the hen", "max_tokens": 4000, "temperature": 0, "ignore_eos": true,
                      "stream": true});
    let mut s = send(a, "POST", "/v1/completions", Some(&long.to_string()), &[]);
    // Read until the first data event: the sequence is running.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // More choices than the server could ever hold: a 400, not a 429 to retry forever.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": ["a", "b"], "max_tokens": 1}),
    );
    assert_error(&r, 400, "at most 1");
    let r = post(a, "/v1/completions", &greedy(json!("x"), 1));
    assert_error(&r, 429, "full");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // The client goes away: its sequence is dropped long before its 4000 tokens.
    drop(s);
    wait_metrics(
        a,
        |m| metric(m, "hayloft_cancelled_total") == 1,
        "the cancellation",
    );
    wait_metrics(
        a,
        |m| metric(m, "hayloft_requests_running") == 0,
        "the slot to free",
    );
    let m = get(a, "/metrics").body;
    assert!(metric(&m, "hayloft_generated_tokens_total") < 4000, "{m}");
    let r = post(a, "/v1/completions", &greedy(json!("x"), 1));
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The Python that has the `openai` package (`HAYLOFT_TEST_PYTHON`, which `.ci/run` sets to a venv with it); None,
/// with a line saying what `test` skips, when it is not set; a failure when it is set but cannot import `openai`.
fn openai_python(test: &str) -> Option<String> {
    let Ok(python) = std::env::var("HAYLOFT_TEST_PYTHON") else {
        eprintln!(
            "{test}: skipped, HAYLOFT_TEST_PYTHON is not set (.ci/run sets it to a venv with the `openai` package)"
        );
        return None;
    };
    let check = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .unwrap_or_else(|e| panic!("HAYLOFT_TEST_PYTHON={python} does not run: {e}"));
    assert!(
        check.status.success(),
        "HAYLOFT_TEST_PYTHON={python} has no `openai` package ({}); install it with `{python} -m pip install \
         openai`",
        String::from_utf8_lossy(&check.stderr)
    );
    Some(python)
}

/// Runs `tests/<script>` with `args`; it must exit 0 and print "all checks passed".
fn run_python_checks(python: &str, script: &str, args: &[String]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{python} does not run: {e}"));
    assert!(
        out.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}

#[test]
fn openai_python_client() {
    let Some(python) = openai_python("openai_python_client") else {
        return;
    };
    let t = tiny(
        &TinySpec::default(),
        ServeConfig {
            api_key: Some("test-key".into()),
            ..Default::default()
        },
    );
    let base = format!("http://{}/v1", t.server.addr);
    run_python_checks(&python, "openai_client.py", &[base, "test-key".into()]);
}

#[test]
fn smollm2_chat_over_http() {
    let path = common::model("smollm2-135m");
    let server = Server::start(
        ServeConfig {
            port: 0,
            ..Default::default()
        },
        Box::new(move || ServeModel::open(&path)),
    )
    .unwrap();
    server.wait_loaded().unwrap();
    let r = post(
        server.addr,
        "/v1/completions",
        &greedy(json!("The capital of France is"), 4),
    );
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text:?}");
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user",
        "content": "Say hi"}], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert!(
        !c["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{c}"
    );
    assert!(
        c["usage"]["prompt_tokens"].as_u64().unwrap() > 10,
        "the template's system turn: {c}"
    );
    // JSON mode: the greedy answer is a JSON object, ended where it closes.
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user",
        "content": "Give the name and age of Alice, who is 30, as a JSON object."}],
        "max_tokens": 80, "temperature": 0, "response_format": {"type": "json_object"}}),
    );
    let (text, finish) = choice_text(&r, false, 0);
    assert_eq!(finish, "stop", "{text:?}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(v["name"], "Alice", "{text}");
}

/// Serves the model file at `path` (several servers may share one file).
fn serve_file(path: &Path, cfg: ServeConfig) -> Server {
    let p = path.to_path_buf();
    let server = Server::start(
        ServeConfig { port: 0, ..cfg },
        Box::new(move || ServeModel::open(&p)),
    )
    .unwrap();
    server.wait_loaded().unwrap();
    server
}

/// Greedy token ids, `ignore_eos`, as ids; the answer's text and its usage.
fn ids_request(prompt: &[u32], max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn text_and_cached(r: &Resp) -> (String, u64) {
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    (
        j["choices"][0]["text"].as_str().unwrap().to_string(),
        j["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

/// `n` token ids from a seed (byte tokens of the tiny vocabulary).
fn id_prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 32 + (i.wrapping_mul(7).wrapping_add(seed * 13)) % 90)
        .collect()
}

#[test]
fn concurrent_sequences_share_batched_steps_and_answer_as_if_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, &slow_spec()).unwrap();
    let server = serve_file(
        &path,
        ServeConfig {
            parallel: 8,
            queue: 8,
            ..Default::default()
        },
    );
    let a = server.addr;
    // Prompts of different lengths (one over a prefill chunk) so that prefill pieces and decode steps mix.
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| id_prompt(i, 5 + 40 * i as usize)).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| text_and_cached(&post(a, "/v1/completions", &ids_request(p, 24))).0)
        .collect();
    let m0 = get(a, "/metrics").body;
    let go = std::sync::Arc::new(std::sync::Barrier::new(prompts.len()));
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (p, go) = (p.clone(), go.clone());
            std::thread::spawn(move || {
                go.wait();
                text_and_cached(&post(a, "/v1/completions", &ids_request(&p, 24))).0
            })
        })
        .collect();
    for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
        assert_eq!(&h.join().unwrap(), want, "prompt {i}");
    }
    let m1 = get(a, "/metrics").body;
    let d = |name: &str| metric(&m1, name) - metric(&m0, name);
    let (steps, seqs) = (
        d("hayloft_batch_steps_total"),
        d("hayloft_batch_sequences_total"),
    );
    // Alone, a request takes one step per token (plus its prefill); together they must have shared steps.
    assert!(
        seqs as f64 / steps as f64 > 2.0,
        "mean batch {seqs}/{steps}"
    );
}

fn ram_prefix() -> ServeConfig {
    ServeConfig {
        prefix: Some(StoreConfig::ram(64 << 20)),
        ..Default::default()
    }
}

#[test]
fn a_repeated_or_shared_prefix_is_served_from_the_cache_with_the_same_answer() {
    let t = tiny(&TinySpec::default(), ram_prefix());
    let a = t.server.addr;
    let p = id_prompt(1, 100);
    let (cold, c0) = text_and_cached(&post(a, "/v1/completions", &ids_request(&p, 16)));
    assert_eq!(c0, 0);
    let (warm, c1) = text_and_cached(&post(a, "/v1/completions", &ids_request(&p, 16)));
    // Whole 32-token blocks of the first 99 tokens (the last is always fed).
    assert_eq!(c1, 96);
    assert_eq!(warm, cold);
    // Another prompt sharing the first 70 tokens: two blocks reused, the same answer as without the cache.
    let mut q = p[..70].to_vec();
    q.extend(id_prompt(9, 30));
    let (shared, c2) = text_and_cached(&post(a, "/v1/completions", &ids_request(&q, 16)));
    assert_eq!(c2, 64);
    let plain = tiny(&TinySpec::default(), ServeConfig::default());
    let (want, _) = text_and_cached(&post(
        plain.server.addr,
        "/v1/completions",
        &ids_request(&q, 16),
    ));
    assert_eq!(shared, want);
    let m = get(a, "/metrics").body;
    assert_eq!(metric(&m, "hayloft_prefix_cache_hits_total"), 2, "{m}");
    assert_eq!(metric(&m, "hayloft_prefix_cache_misses_total"), 1, "{m}");
    assert_eq!(
        metric(&m, "hayloft_prefix_cache_hit_tokens_total"),
        160,
        "{m}"
    );
    assert!(
        metric(&m, "hayloft_prefix_cache_bytes{tier=\"ram\"}") > 0,
        "{m}"
    );
    // Echo needs every prompt token's log-probability: no cache there, and the same numbers.
    let e = post(
        a,
        "/v1/completions",
        &json!({"prompt": p, "max_tokens": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(e.status, 200, "{}", e.body);
    assert_eq!(
        e.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
}

/// Two servers on one tier reuse each other's prefixes; a corrupt blob is refused and its prefix recomputed.
fn shared_tier(tier: impl Fn() -> StoreConfig, corrupt: Option<&Path>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // A seed of its own: entries other runs left in a shared Redis do not match this model.
    let spec = TinySpec {
        seed: std::process::id() as u64 ^ 0x5eed,
        ..Default::default()
    };
    write_tiny_llama(&path, &spec).unwrap();
    let cfg = || ServeConfig {
        prefix: Some(tier()),
        ..Default::default()
    };
    // One 256-token unit of the tier and a few more.
    let p = id_prompt(3, 300);
    let first = serve_file(&path, cfg());
    let (cold, c0) = text_and_cached(&post(first.addr, "/v1/completions", &ids_request(&p, 8)));
    assert_eq!(c0, 0);
    let m = get(first.addr, "/metrics").body;
    assert!(metric(&m, "hayloft_prefix_tier_writes_total") >= 1, "{m}");
    drop(first);
    let second = serve_file(&path, cfg());
    let (_, c1) = text_and_cached(&post(second.addr, "/v1/completions", &ids_request(&p, 8)));
    assert_eq!(c1, 256, "the second server reuses the first one's unit");
    let m = get(second.addr, "/metrics").body;
    assert_eq!(metric(&m, "hayloft_prefix_tier_hits_total"), 1, "{m}");
    drop(second);
    let Some(d) = corrupt else { return };
    for e in std::fs::read_dir(d).unwrap() {
        let f = e.unwrap().path();
        let mut b = std::fs::read(&f).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(&f, b).unwrap();
    }
    let third = serve_file(&path, cfg());
    let (text, c2) = text_and_cached(&post(third.addr, "/v1/completions", &ids_request(&p, 8)));
    assert_eq!(c2, 0, "a corrupt unit is not reused");
    assert_eq!(text, cold, "and its prefix is recomputed");
    let m = get(third.addr, "/metrics").body;
    assert!(metric(&m, "hayloft_prefix_tier_errors_total") >= 1, "{m}");
}

#[test]
fn servers_sharing_a_disk_dir_reuse_prefixes_and_refuse_a_corrupt_one() {
    let kv = tempfile::tempdir().unwrap();
    let d = kv.path().to_path_buf();
    shared_tier(
        || StoreConfig {
            disk: Some(d.clone()),
            ..StoreConfig::ram(64 << 20)
        },
        Some(kv.path()),
    );
}

#[test]
fn servers_sharing_redis_reuse_prefixes() {
    let Ok(url) = std::env::var("HAYLOFT_REDIS_URL") else {
        assert!(
            std::env::var("HAYLOFT_REDIS_REQUIRED").is_err(),
            "HAYLOFT_REDIS_REQUIRED is set but HAYLOFT_REDIS_URL is not"
        );
        eprintln!("servers_sharing_redis_reuse_prefixes: skipped, HAYLOFT_REDIS_URL is not set (.ci/run sets it)");
        return;
    };
    shared_tier(
        || StoreConfig {
            redis: Some(url.clone()),
            ..StoreConfig::ram(64 << 20)
        },
        None,
    );
}

#[test]
fn a_kv_budget_holds_under_load_and_every_request_is_answered_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama(&path, &slow_spec()).unwrap();
    let (n_prompt, n_new) = (60, 40);
    let plan = {
        let g = hayloft::gguf::GgufFile::open(&path).unwrap();
        let model = Model::from_gguf(&g).unwrap();
        let s = Session::new(&model, SessionConfig::for_model(&model)).unwrap();
        s.plan_memory(Lengths::generate(n_prompt, n_new))
            .unwrap()
            .kv
    };
    // Room for two sequences at once, though --parallel allows eight.
    let budget = plan * 5 / 2;
    let server = serve_file(
        &path,
        ServeConfig {
            parallel: 8,
            queue: 4,
            kv_budget: Some(budget),
            ..Default::default()
        },
    );
    let a = server.addr;
    let n = 16;
    let go = std::sync::Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let go = go.clone();
            std::thread::spawn(move || {
                go.wait();
                post(
                    a,
                    "/v1/completions",
                    &ids_request(&id_prompt(i as u32, n_prompt), n_new),
                )
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in handles {
        let r = h.join().unwrap();
        match r.status {
            200 => {
                assert_eq!(r.json()["usage"]["completion_tokens"], n_new);
                ok += 1;
            }
            429 => {
                assert!(r.header("retry-after").is_some());
                busy += 1;
            }
            s => panic!("status {s}: {}", r.body),
        }
    }
    assert_eq!(ok + busy, n);
    // Two run, four wait: at least six are answered; ten arrivals at once find the queue full.
    assert!(ok >= 6, "{ok} answered, {busy} refused");
    assert!(busy >= 1, "{ok} answered, {busy} refused");
    let m = get(a, "/metrics").body;
    let peak = metric(&m, "hayloft_kv_cache_bytes_peak");
    assert!(
        peak > 0 && peak as usize <= budget,
        "peak {peak} > budget {budget}"
    );
    assert!(
        peak as usize > plan / 2,
        "peak {peak}: were two sequences ever running together?"
    );
    // A request whose plan alone is over the budget can never run: 400, not a wait.
    let r = post(
        a,
        "/v1/completions",
        &ids_request(&id_prompt(0, 2000), 1000),
    );
    assert_error(&r, 400, "--kv-budget");
}

/// Two function definitions: one whose parameters the JSON-schema subset takes (an enum, a required key), and one
/// with plain numbers.
fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "add", "description": "Adds two numbers",
         "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                        "required": ["a", "b"]}}}
    ])
}

/// A real chat template's source from the chat-template fixture (tests/fixtures/chat_templates.json).
fn fixture_template(file: &str) -> String {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string("tests/fixtures/chat_templates.json").unwrap(),
    )
    .unwrap();
    let t = f["templates"].as_array().unwrap().iter();
    let t = t.into_iter().find(|t| t["file"] == file);
    t.unwrap_or_else(|| panic!("{file} not in the fixture"))["source"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Function calling through templates that write calls in other formats than Hermes: Llama 3.1's JSON and
/// Mistral's two. A named call decodes under the call constraint on a random-weight model (so the call is made
/// whatever the weights), comes back read in that format (Mistral's ids 9 letters and digits), and the call and its
/// result go back through the template in a follow-up request (Mistral's templates refuse ids of another shape).
#[test]
fn llama3_and_mistral_templates_take_tools_and_give_calls_back() {
    let spec = TinySpec {
        ctx_len: 4096,
        ..Default::default()
    };
    let ping = json!({"type": "function", "function": {"name": "ping", "description": "Checks the server",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": false}}});
    let mut tools = weather_tools();
    tools.as_array_mut().unwrap().push(ping);
    for (file, id_len) in [
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", 29),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", 9),
        ("Mistral-Small-3.2-24B-Instruct-2506.jinja", 9),
    ] {
        let t = tiny_with_template(&spec, &fixture_template(file));
        let a = t.server.addr;
        let user = json!({"role": "user", "content": "Is the server up?"});
        let ask = |extra: Value| {
            // Room for the call and the whitespace runs a random model puts between its JSON tokens.
            let mut body = json!({"messages": [user], "max_tokens": 400, "temperature": 0});
            merge(&mut body, &extra);
            post(a, "/v1/chat/completions", &body)
        };
        let plain = ask(json!({"max_tokens": 1}));
        assert_eq!(plain.status, 200, "{file}: {}", plain.body);
        let named = json!({"type": "function", "function": {"name": "ping"}});
        let r = ask(json!({"tools": tools, "tool_choice": named}));
        assert_eq!(r.status, 200, "{file}: {}", r.body);
        let j = r.json();
        // The definitions are in the prompt.
        let (with, without) = (
            j["usage"]["prompt_tokens"].as_u64().unwrap(),
            plain.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
        );
        assert!(with > without + 100, "{file}: {with} vs {without}");
        let c = &j["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{file}: {j}");
        let call = &c["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "ping", "{file}: {j}");
        assert_eq!(call["function"]["arguments"], "{}", "{file}: {j}");
        let id = call["id"].as_str().unwrap();
        assert!(
            id.len() == id_len && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{file}: {id}"
        );
        let turns = json!([user, {"role": "assistant", "content": null, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": id, "name": "ping", "content": "up"}]);
        let r = ask(json!({"messages": turns, "tools": tools, "max_tokens": 2}));
        assert_eq!(r.status, 200, "{file}: {}", r.body);
        // A streamed forced call: its deltas add up to the call, finish "stop".
        let r = post(
            a,
            "/v1/chat/completions",
            &json!({"messages": [user], "tools": tools, "tool_choice": named, "max_tokens": 400,
                    "temperature": 0, "stream": true}),
        );
        assert_eq!(r.status, 200, "{file}: {}", r.body);
        let events = r.sse();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let calls: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
            .flat_map(|d| d.as_array().unwrap())
            .collect();
        assert!(!calls.is_empty(), "{file}: {}", r.body);
        assert_eq!(calls[0]["function"]["name"], "ping");
        let args: String = calls
            .iter()
            .map(|d| d["function"]["arguments"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(args, "{}", "{file}: {}", r.body);
        let last = chunks
            .iter()
            .rev()
            .find(|c| !c["choices"][0]["finish_reason"].is_null());
        assert_eq!(
            last.unwrap()["choices"][0]["finish_reason"],
            "stop",
            "{file}"
        );
    }
}

/// `tool_choice: "auto"` decodes each call the model begins under the tools' schema, and leaves the rest of the
/// answer free (llama.cpp's lazy grammars). A random-weight model carrying the Qwen2.5, Llama 3.1, Mistral Nemo and
/// Mistral Small 3.2 templates, with the format's marker as one token of its vocabulary (a user-defined one, or a
/// control token without text for Llama's `<|python_tag|>`), is pushed by `logit_bias` to write the marker first and
/// to end the answer right after (the end is banned for the first token by `min_tokens`, and by the constraint
/// inside the call): whatever its weights, what follows the marker is an `add` or `scale` call with that function's
/// arguments (for Small 3.2, `NAME[ARGS]{...}`: a function's name first, `[ARGS]` a control token or text; for
/// Qwen3-Coder's XML, `<function=NAME>` and a `<parameter=KEY>` element per argument, its value a number). Without
/// tools the same biases give the marker and the end.
#[test]
fn auto_calls_decode_under_the_schema_once_begun() {
    for (file, marker, ty, args) in [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "<tool_call>", 4, None),
        (
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            "<|python_tag|>",
            3,
            None,
        ),
        (
            "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            "[TOOL_CALLS]",
            3,
            None,
        ),
        (
            "Mistral-Small-3.2-24B-Instruct-2506.jinja",
            "[TOOL_CALLS]",
            3,
            Some("[ARGS]"),
        ),
        // Qwen3-Coder's XML calls (the template above).
        ("XML_TEMPLATE", "<tool_call>", 4, None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        // Room for Small 3.2's long system prompt and max_tokens.
        let mut w = tiny_llama(&TinySpec {
            ctx_len: 8192,
            ..Default::default()
        });
        let template = match file {
            "XML_TEMPLATE" => XML_TEMPLATE.to_string(),
            f => fixture_template(f),
        };
        w.set_meta("tokenizer.chat_template", GgufValue::String(template));
        // Byte 0x01's token (never in these prompts) becomes the marker.
        let (tokens, types) = (
            w.meta_value("tokenizer.ggml.tokens"),
            w.meta_value("tokenizer.ggml.token_type"),
        );
        let (Some(GgufValue::Array(mut tokens)), Some(GgufValue::Array(mut types))) =
            (tokens, types)
        else {
            panic!("no vocabulary");
        };
        tokens[1] = GgufValue::String(marker.into());
        types[1] = GgufValue::I32(ty);
        // Byte 0x02's token becomes `[ARGS]`, a control token as in Mistral's vocabularies.
        if let Some(a) = args {
            tokens[2] = GgufValue::String(a.into());
            types[2] = GgufValue::I32(3);
        }
        w.set_meta("tokenizer.ggml.tokens", GgufValue::Array(tokens));
        w.set_meta("tokenizer.ggml.token_type", GgufValue::Array(types));
        w.write(&path).unwrap();
        let t = serve_tiny(dir, path, ServeConfig::default());
        // Numbers only: a random model's free string could run to max_tokens.
        let tools = json!([weather_tools()[1],
            {"type": "function", "function": {"name": "scale", "description": "Scales a number",
             "parameters": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}]);
        let body = json!({"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": tools,
                          "max_tokens": 1500, "temperature": 0, "min_tokens": 1,
                          "logit_bias": {"1": 50, "257": 100}});
        let r = post(t.server.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{file}: {}", r.body);
        let j = r.json();
        let c = &j["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{file}: {j}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{file}: {j}");
        let f = &calls[0]["function"];
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        match f["name"].as_str().unwrap() {
            "add" => assert!(
                args["a"].is_number()
                    && args["b"].is_number()
                    && args.as_object().unwrap().len() == 2,
                "{file}: {j}"
            ),
            "scale" => assert!(
                args["x"].is_number() && args.as_object().unwrap().len() == 1,
                "{file}: {j}"
            ),
            other => panic!("{file}: {other}: {j}"),
        }
        // The same biases without tools: the marker, then the end; no call.
        let mut plain = body.clone();
        plain.as_object_mut().unwrap().remove("tools");
        let j = post(t.server.addr, "/v1/chat/completions", &plain).json();
        assert_eq!(j["choices"][0]["finish_reason"], "stop", "{file}: {j}");
        assert_eq!(j["usage"]["completion_tokens"], 2, "{file}: {j}");
    }
}

/// A chat template in Qwen3-Coder's style: tool definitions in the system turn, calls as `<function=NAME>` with a
/// `<parameter=KEY>` element per argument.
const XML_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
# Tools
{%- for tool in tools %}
<function><name>{{ tool.function.name }}</name></function>
{%- endfor %}
To call a function reply:
<tool_call>
<function=example_function_name>
<parameter=example_parameter_1>
value_1
</parameter>
</function>
</tool_call><|im_end|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}
<|im_start|>assistant
{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}
<tool_call>
<function={{ tool_call.name }}>
{%- for args_name, args_value in tool_call.arguments|items %}
<parameter={{ args_name }}>
{{ args_value }}
</parameter>
{%- endfor %}
</function>
</tool_call>
{%- endfor %}<|im_end|>
{%- elif message.role == "tool" %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{%- endif %}"#;

/// Qwen3-Coder's XML calls through the server: a template in its style (definitions in the system turn, past calls
/// as `<function=NAME>` with a `<parameter=KEY>` element per argument) on a random-weight model. A named call
/// decodes under the JSON call constraint and comes back as the call; sent back with its result, the template
/// writes it as XML into the next prompt.
#[test]
fn xml_call_templates_take_tools_and_write_calls_back() {
    let t = tiny_with_template(
        &TinySpec {
            ctx_len: 4096,
            ..Default::default()
        },
        XML_TEMPLATE,
    );
    let a = t.server.addr;
    let user = json!({"role": "user", "content": "Add 2 and 3."});
    let named = json!({"type": "function", "function": {"name": "add"}});
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": [user], "tools": weather_tools(), "tool_choice": named, "max_tokens": 600,
                "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let call = &j["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "add", "{j}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["a"].is_number() && args["b"].is_number(), "{j}");
    let turns = json!([user, {"role": "assistant", "content": null, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": call["id"], "content": "5"}]);
    let tokens = post(
        a,
        "/tokenize",
        &json!({"messages": turns, "tools": weather_tools()}),
    )
    .json()["tokens"]
        .clone();
    let text = post(a, "/detokenize", &json!({"tokens": tokens})).json()["prompt"].clone();
    let text = text.as_str().unwrap();
    assert!(
        [
            "<function=add>",
            "<parameter=a>",
            "<parameter=b>",
            "<tool_response>\n5\n"
        ]
        .iter()
        .all(|p| text.contains(p)),
        "{text}"
    );
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": turns, "tools": weather_tools(), "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A reasoning model's thinking comes back apart from the answer (llama-server's `reasoning_format` "auto"): the
/// DeepSeek-R1 distills' template opens `<think>` in the prompt, so a random-weight model's answer, which never
/// closes it, is all reasoning and no content, plain and streamed alike; `"reasoning_format": "none"` leaves it as
/// content; an unknown value is a 400; a JSON answer is all content.
#[test]
fn thinking_comes_back_as_reasoning_content() {
    let t = tiny_with_template(
        &TinySpec::default(),
        &fixture_template("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"),
    );
    let a = t.server.addr;
    let ask = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Why is the sky blue?"}],
                              "max_tokens": 24, "temperature": 0});
        merge(&mut body, &extra);
        post(a, "/v1/chat/completions", &body)
    };
    let r = ask(json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let m = &j["choices"][0]["message"];
    let reasoning = m["reasoning_content"]
        .as_str()
        .unwrap_or_else(|| panic!("{j}"));
    assert!(!reasoning.is_empty());
    assert_eq!(m["content"], "", "{j}");
    // As text: the same answer, untrimmed, and no reasoning field.
    let r = ask(json!({"reasoning_format": "none"}));
    let j = r.json();
    let m = &j["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{j}");
    assert_eq!(m["content"].as_str().unwrap().trim(), reasoning);
    // Streamed: reasoning_content deltas add up to the plain answer's reasoning, and no content comes.
    let r = ask(json!({"stream": true}));
    let (mut streamed, mut content) = (String::new(), String::new());
    for e in r.sse().iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let d = &c["choices"][0]["delta"];
        streamed.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed, reasoning);
    assert_eq!(content, "");
    assert_error(
        &ask(json!({"reasoning_format": "hidden"})),
        400,
        "reasoning_format",
    );
    // Under a JSON constraint the whole answer is the value, not thinking.
    let r = ask(json!({"response_format": {"type": "json_object"}, "max_tokens": 400}));
    let j = r.json();
    let m = &j["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{j}");
    assert!(
        m["content"].as_str().unwrap().trim_start().starts_with('{'),
        "{j}"
    );
}

/// `chat_template_kwargs` (vLLM's and llama-server's field) reaches the template: Qwen3's `enable_thinking: false`
/// closes an empty `<think>` block in the prompt (the prompt grows by that block's tokens), and
/// `/tokenize` counts the same prompt; a variable the server sets, or a value that is not an object, is a 400. An
/// assistant turn's `reasoning_content` reaches the template too.
#[test]
fn chat_template_kwargs_reach_the_template() {
    let t = tiny_with_template(
        &TinySpec::default(),
        &fixture_template("Qwen-Qwen3-0.6B.jinja"),
    );
    let a = t.server.addr;
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let ask = |extra: Value| {
        let mut body = json!({"messages": msgs, "max_tokens": 1, "temperature": 0});
        merge(&mut body, &extra);
        post(a, "/v1/chat/completions", &body)
    };
    let used = |r: &Resp| {
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = used(&ask(json!({})));
    let off = json!({"chat_template_kwargs": {"enable_thinking": false}});
    let no_think = used(&ask(off.clone()));
    let block = json!({"prompt": "<think>\n\n</think>\n\n", "add_special_tokens": false});
    let block = post(a, "/tokenize", &block).json()["count"]
        .as_u64()
        .unwrap();
    assert_eq!(no_think, plain + block);
    let mut tok = json!({"messages": msgs});
    tok["chat_template_kwargs"] = off["chat_template_kwargs"].clone();
    assert_eq!(post(a, "/tokenize", &tok).json()["count"], no_think);
    // An assistant turn's reasoning_content (as the server gives it back) goes to the template: Qwen3's writes it
    // inside <think> for the turns of a tool loop.
    let call = json!({"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}});
    let turns = |reasoning: Value| {
        let mut assistant = json!({"role": "assistant", "content": "", "tool_calls": [call]});
        assistant["reasoning_content"] = reasoning;
        json!({"messages": [{"role": "user", "content": "Weather?"}, assistant,
                            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
               "tools": weather_tools()})
    };
    let count = |body: Value| {
        post(a, "/tokenize", &body).json()["count"]
            .as_u64()
            .unwrap()
    };
    let thought = json!("I should call get_weather.");
    let (with, without) = (count(turns(thought)), count(turns(Value::Null)));
    let extra = json!({"prompt": "<think>\nI should call get_weather.\n</think>\n\n", "add_special_tokens": false});
    assert_eq!(with, without + count(extra));
    assert_error(
        &ask(json!({"chat_template_kwargs": {"messages": []}})),
        400,
        "field `chat_template_kwargs`: 'messages' is set by the server",
    );
    assert_error(
        &ask(json!({"chat_template_kwargs": [1]})),
        400,
        "chat_template_kwargs",
    );
}

#[test]
fn tool_requests_a_model_cannot_take_are_refused_naming_the_field() {
    let t = small();
    let a = t.server.addr;
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "temperature": 0});
        merge(&mut body, &extra);
        post(a, "/v1/chat/completions", &body)
    };
    // The tiny model's ChatML template never reads `tools`: the model would not see them.
    assert_error(
        &chat(json!({"tools": weather_tools()})),
        400,
        "does not render tool definitions",
    );
    // Malformed definitions and choices, before the template is asked.
    let mut bad = weather_tools();
    bad[1]["type"] = json!("retrieval");
    assert_error(&chat(json!({"tools": bad})), 400, "tools[1].type");
    let mut bad = weather_tools();
    bad[0]["function"]["name"] = json!("get weather");
    assert_error(&chat(json!({"tools": bad})), 400, "tools[0].function.name");
    let mut bad = weather_tools();
    bad[1]["function"]["name"] = json!("get_weather");
    assert_error(&chat(json!({"tools": bad})), 400, "defined twice");
    let mut bad = weather_tools();
    bad[0]["function"]["parameters"] = json!([1]);
    assert_error(
        &chat(json!({"tools": bad})),
        400,
        "tools[0].function.parameters",
    );
    let named = json!({"type": "function", "function": {"name": "mul"}});
    assert_error(
        &chat(json!({"tools": weather_tools(), "tool_choice": named})),
        400,
        "'mul' is not among",
    );
    assert_error(
        &chat(json!({"tools": weather_tools(), "tool_choice": "always"})),
        400,
        "tool_choice",
    );
    assert_error(
        &chat(json!({"tool_choice": "required"})),
        400,
        "`tools` is empty",
    );
    // A past call's arguments must be a JSON object.
    let msgs = json!([{"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "add", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]);
    assert_error(
        &chat(json!({"messages": msgs})),
        400,
        "messages[1].tool_calls[0].function.arguments",
    );
    // Completions take no tools.
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 1, "tools": weather_tools()}),
    );
    assert_error(&r, 400, "/v1/chat/completions");
    // tool_choice "none" leaves the definitions out: a plain answer.
    let r = chat(json!({"tools": weather_tools(), "tool_choice": "none"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["choices"][0]["message"]["content"].is_string());
    assert!(r.json()["choices"][0]["message"]
        .get("tool_calls")
        .is_none());
}

/// The answer's calls: (name, arguments parsed), and the finish reason; streamed answers put together from their
/// deltas, with no text of a call leaking into the content.
fn tool_calls_of(r: &Resp, stream: bool) -> (Vec<(String, Value)>, Option<String>, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    let (calls, content, finish) = if stream {
        let (mut calls, mut content, mut finish) = (Vec::new(), String::new(), String::new());
        for e in r.sse().iter().filter(|e| *e != "[DONE]") {
            let c: Value = serde_json::from_str(e).unwrap();
            let ch = &c["choices"][0];
            content.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
            // Deltas put together by index, as clients do: the first piece of a call has its id, type and name,
            // later ones more of its arguments.
            for d in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = d["index"].as_u64().unwrap() as usize;
                let piece = d["function"]["arguments"].as_str().unwrap_or("");
                if i == calls.len() {
                    assert!(
                        d["id"].is_string() && d["function"]["name"].is_string(),
                        "{d}"
                    );
                    calls.push((d.clone(), 1));
                } else {
                    assert!(
                        d.get("id").is_none() && d["function"].get("name").is_none(),
                        "{d}"
                    );
                    let (c, pieces) = &mut calls[i];
                    let args = c["function"]["arguments"].as_str().unwrap().to_string() + piece;
                    c["function"]["arguments"] = json!(args);
                    *pieces += 1;
                }
            }
            if let Some(f) = ch["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        // Arguments longer than a few bytes come in pieces as they are written, not in one delta at the end.
        for (c, pieces) in &calls {
            let args = c["function"]["arguments"].as_str().unwrap();
            assert!(args.len() < 8 || *pieces > 1, "{args} in {pieces} delta");
        }
        let calls = calls.into_iter().map(|(c, _)| c).collect();
        (calls, Some(content).filter(|c| !c.is_empty()), finish)
    } else {
        let j = r.json();
        let m = &j["choices"][0]["message"];
        (
            m["tool_calls"].as_array().cloned().unwrap_or_default(),
            m["content"].as_str().map(str::to_string),
            j["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    let calls = calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            assert!(c["id"].as_str().unwrap().starts_with("call_"), "{c}");
            let args = c["function"]["arguments"].as_str().unwrap();
            let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"));
            (c["function"]["name"].as_str().unwrap().to_string(), args)
        })
        .collect();
    (calls, content, finish)
}

#[test]
fn qwen25_calls_tools_over_http() {
    let server = serve_file(&common::model("qwen2.5-0.5b"), ServeConfig::default());
    let a = server.addr;
    let ask = |question: &str, extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": question}], "tools": weather_tools(),
                              "temperature": 0, "max_tokens": 60});
        merge(&mut body, &extra);
        post(a, "/v1/chat/completions", &body)
    };
    // "auto": the model calls get_weather for Paris (it answers a bare call object, without <tool_call> tags),
    // plain and streamed alike.
    for stream in [false, true] {
        let r = ask(
            "What's the weather like in Paris right now?",
            json!({"stream": stream}),
        );
        let (calls, content, finish) = tool_calls_of(&r, stream);
        assert_eq!(finish, "tool_calls", "stream {stream}: {}", r.body);
        assert_eq!(content, None, "stream {stream}");
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].0, "get_weather");
        assert_eq!(calls[0].1["city"], "Paris", "{calls:?}");
    }
    // /tokenize renders the same prompt, tools and all: its count is the request's prompt_tokens.
    let question =
        json!([{"role": "user", "content": "What's the weather like in Paris right now?"}]);
    let used = ask(
        "What's the weather like in Paris right now?",
        json!({"max_tokens": 1}),
    )
    .json()["usage"]["prompt_tokens"]
        .clone();
    let t = post(
        a,
        "/tokenize",
        &json!({"messages": question, "tools": weather_tools()}),
    );
    assert_eq!(t.json()["count"], used, "{}", t.body);
    let bare = post(a, "/tokenize", &json!({"messages": question})).json()["count"].clone();
    assert!(
        bare.as_u64().unwrap() + 100 < used.as_u64().unwrap(),
        "{bare} {used}"
    );
    // A question no tool fits: text, finish "stop".
    let (calls, content, finish) =
        tool_calls_of(&ask("Write a haiku about autumn.", json!({})), false);
    assert!(calls.is_empty() && finish == "stop", "{calls:?} {finish}");
    assert!(!content.unwrap().contains("\"name\""));
    // A named function: decoding is held to its call, with arguments its parameters schema accepts; OpenAI finishes
    // such a call with "stop".
    let named = json!({"tool_choice": {"type": "function", "function": {"name": "add"}}});
    for stream in [false, true] {
        let mut extra = named.clone();
        extra["stream"] = json!(stream);
        let (calls, _, finish) = tool_calls_of(&ask("What is 2 + 3.5?", extra), stream);
        assert_eq!(finish, "stop");
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].0, "add");
        assert!(
            calls[0].1["a"].is_number() && calls[0].1["b"].is_number(),
            "{calls:?}"
        );
    }
    // "required" picks among the tools.
    let (calls, _, finish) = tool_calls_of(
        &ask("Weather in Oslo?", json!({"tool_choice": "required"})),
        false,
    );
    // A list of calls (below): this small model adds a call to `add` after the weather one.
    assert_eq!(finish, "tool_calls", "{calls:?}");
    assert_eq!(calls[0].0, "get_weather", "{calls:?}");
    assert!(calls
        .iter()
        .all(|c| ["get_weather", "add"].contains(&c.0.as_str())));
    // "required" with parallel calls (the default) decodes a list of calls, as vLLM does: two cities, two calls,
    // plain and streamed; with parallel_tool_calls false, one.
    for stream in [false, true] {
        let extra = json!({"tool_choice": "required", "stream": stream});
        let r = ask("What is the weather in Oslo and in Paris?", extra);
        let (calls, content, finish) = tool_calls_of(&r, stream);
        assert_eq!(finish, "tool_calls", "{calls:?}");
        assert_eq!(content, None);
        let cities: Vec<&str> = calls
            .iter()
            .map(|c| c.1["city"].as_str().unwrap())
            .collect();
        assert_eq!(cities, ["Oslo", "Paris"], "{calls:?}");
        assert!(calls.iter().all(|c| c.0 == "get_weather"), "{calls:?}");
    }
    let extra = json!({"tool_choice": "required", "parallel_tool_calls": false});
    let r = ask("What is the weather in Oslo and in Paris?", extra);
    assert_eq!(tool_calls_of(&r, false).0.len(), 1);
    // The call and its result go back into the prompt through the template.
    let msgs = json!([{"role": "user", "content": "What's the weather like in Paris right now?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 18, \"sky\": \"light rain\"}"}]);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": msgs, "tools": weather_tools(), "temperature": 0, "max_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let first = ask(
        "What's the weather like in Paris right now?",
        json!({"max_tokens": 1}),
    );
    let tokens = |r: &Resp| r.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        tokens(&r) > tokens(&first) + 20,
        "{} vs {}",
        tokens(&r),
        tokens(&first)
    );
    // A response_format beside a forced call is refused: the answer is the call.
    let mut extra = named.clone();
    extra["response_format"] = json!({"type": "json_object"});
    assert_error(&ask("What is 2 + 3.5?", extra), 400, "response_format");
    // The real openai client reads the calls (plain and streamed) into its types and sends its message back.
    if let Some(python) = openai_python("qwen25_calls_tools_over_http (its openai client part)") {
        run_python_checks(&python, "openai_tools.py", &[format!("http://{a}/v1")]);
    }
}
