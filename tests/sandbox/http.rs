//! A small HTTP/1.1 server in a namespace, standing in for a feed
//! publisher: serves what the test sets, with an ETag, answers a matching
//! `If-None-Match` with 304, counts requests, and can be told to fail.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use crate::netns::Netns;

#[derive(Default)]
struct File {
    body: Vec<u8>,
    version: u64,
    /// Answer with this status (and no body) instead.
    failing: Option<u16>,
    requests: u64,
    not_modified: u64,
}

#[derive(Clone)]
pub struct HttpServer {
    addr: SocketAddr,
    files: Arc<Mutex<HashMap<String, File>>>,
}

impl HttpServer {
    /// Listens on `addr` (an address of `ns`) until the process ends.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<HttpServer> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        let server = HttpServer {
            addr,
            files: Arc::default(),
        };
        let files = server.files.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let files = files.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &files);
                });
            }
        });
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serves `body` at `path` under a new ETag, and stops failing it.
    pub fn set(&self, path: &str, body: &str) {
        let mut files = self.files.lock().unwrap();
        let file = files.entry(path.to_owned()).or_default();
        file.body = body.as_bytes().to_vec();
        file.version += 1;
        file.failing = None;
    }

    /// Answers `path` with `status` until the next [`Self::set`] or [`Self::heal`].
    pub fn fail(&self, path: &str, status: u16) {
        self.files
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default()
            .failing = Some(status);
    }

    /// Serves the last body again, under the same ETag.
    pub fn heal(&self, path: &str) {
        if let Some(file) = self.files.lock().unwrap().get_mut(path) {
            file.failing = None;
        }
    }

    /// Requests for `path` so far, and how many were answered 304.
    pub fn counts(&self, path: &str) -> (u64, u64) {
        let files = self.files.lock().unwrap();
        files
            .get(path)
            .map_or((0, 0), |f| (f.requests, f.not_modified))
    }
}

fn serve(stream: TcpStream, files: &Mutex<HashMap<String, File>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut if_none_match = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("if-none-match") {
                if_none_match = Some(value.trim().to_owned());
            }
        }
    }
    let (status, etag, body) = {
        let mut files = files.lock().unwrap();
        match files.get_mut(&path) {
            None => (404, String::new(), Vec::new()),
            Some(file) => {
                file.requests += 1;
                let etag = format!("\"v{}\"", file.version);
                match file.failing {
                    Some(status) => (status, String::new(), Vec::new()),
                    None if if_none_match.as_deref() == Some(etag.as_str()) => {
                        file.not_modified += 1;
                        (304, etag, Vec::new())
                    }
                    None => (200, etag, file.body.clone()),
                }
            }
        }
    };
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    if !etag.is_empty() {
        head.push_str(&format!("ETag: {etag}\r\n"));
    }
    if status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}
