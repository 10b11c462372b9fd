//! The dashboard in a real headless browser (Debian's `chromium` driven through
//! `chromedriver` over WebDriver): a real `treatyd` with an admin listener and a token file,
//! two bank-account participants, a transaction made stuck by killing one of them. The test
//! enters a read token, finds the stuck transaction listed first, opens it, is refused when
//! it clicks Retry with that token, enters an operate token, heals the participant, clicks
//! Retry and sees the transaction finish. A handler name holding HTML is shown as text and
//! never runs. It saves a screenshot of the list page (`TREATY_DASHBOARD_SCREENSHOT`, by
//! default `dashboard.png` in cargo's test temp dir); `docs/dashboard.png` is one.
//!
//! Needs `chromium` and `chromedriver` on PATH (`apt-get install chromium chromium-driver`):
//! in CI (`CI=true`) a missing one fails the test; elsewhere the test says so and skips.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use treaty_examples::bank::Leg;
use treaty_sdk::{Branch, Client, ClientOptions, Outcome};
use treaty_tests::{wait_until, BankAccount, Treatyd};

const WAIT: Duration = Duration::from_secs(60);
const TOKENS: &str = "submitter = submit, read\nreader = read\nops = operate, read\n";
/// A handler name a careless page would turn into a running script.
const XSS_HANDLER: &str = "<img src=x onerror=\"window.__treatyXss=1\">";

/// `name` on PATH, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver and a chromium binary, or why not.
fn tools() -> Result<(PathBuf, PathBuf), String> {
    let driver = on_path("chromedriver").ok_or("chromedriver is not on PATH")?;
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|n| on_path(n))
        .ok_or("chromium is not on PATH")?;
    Ok((driver, browser))
}

/// A `chromedriver` process on a free local port, in a process group of its own that is
/// killed on drop (with the browsers it started, even when the test fails midway).
struct ChromeDriver {
    child: Child,
    addr: SocketAddr,
}

impl ChromeDriver {
    fn start(bin: &PathBuf) -> ChromeDriver {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        use std::os::unix::process::CommandExt;
        let child = Command::new(bin)
            .arg(format!("--port={}", addr.port()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = ChromeDriver { child, addr };
        let start = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < WAIT,
                "chromedriver did not listen on {addr} within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid (process_group(0)).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless browser session, 1280x800.
async fn browser(driver: &ChromeDriver, chromium: &PathBuf) -> Browser {
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                // As root, chromium runs only without its sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,800",
            ],
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!("an object")
    };
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://{}", driver.addr))
        .await
        .expect("a chromium session through chromedriver");
    c.set_window_size(1280, 800).await.expect("window size");
    c
}

/// The text of the element at `css`, polled until `pred` holds (bounded); panics with the
/// last text seen.
async fn wait_text(b: &Browser, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        if let Ok(e) = b.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if pred(&t) {
                    return t;
                }
                last = t;
            }
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what} in {css}; last text: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn use_token(b: &Browser, token: &str) {
    let input = b.find(Locator::Id("token")).await.expect("token input");
    input.clear().await.expect("clear");
    input.send_keys(token).await.expect("type token");
    b.find(Locator::Id("token-save"))
        .await
        .expect("token button")
        .click()
        .await
        .expect("click");
}

async fn click(b: &Browser, id: &str) {
    b.find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click #{id}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_a_stuck_transaction_from_the_dashboard() {
    let (driver_bin, chromium) = match tools() {
        Ok(t) => t,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{why}: CI must run the browser test; install: apt-get install chromium chromium-driver")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED dashboard browser test: {why}; install with \
                 `apt-get install chromium chromium-driver` to run it"
            );
            return;
        }
    };

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, TOKENS).unwrap();
    let treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &[
            "--admin-listen",
            "127.0.0.1:0",
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--stuck-after-attempts",
            "1",
            // No automatic retry within the test once a call failed (the first attempt of
            // each call goes out at once): the click is what sends the abort after the
            // participant is back, never a timer that happens to fire just before it.
            "--initial-backoff-ms",
            "600000",
            "--max-backoff-ms",
            "600000",
        ],
        &[],
    )
    .unwrap();
    let admin = treatyd.proc.admin_addr(WAIT).unwrap();
    let coord = treatyd.uri();
    let a = BankAccount::start(&dir.path().join("a"), &coord, "alice=100").unwrap();
    let mut b = BankAccount::start(&dir.path().join("b"), &coord, "bob=50").unwrap();
    let client = Client::connect_with(coord.clone(), &ClientOptions::new().token("submitter"))
        .await
        .unwrap();

    // A transaction whose handler name is HTML: aborted, its reason names the handler.
    let xss = client
        .two_phase()
        .branch(Branch::new(a.uri(), XSS_HANDLER).payload(Leg::payload("alice", 1)))
        .deadline(Duration::from_secs(2))
        .submit_and_wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(xss.outcome, Outcome::Aborted);

    // The stuck one: bob's instance is gone, so the abort after the deadline cannot reach it.
    b.kill();
    let stuck = client
        .two_phase()
        .branch(Branch::new(a.uri(), "debit").payload(Leg::payload("alice", 10)))
        .branch(Branch::new(b.uri(), "credit").payload(Leg::payload("bob", 10)))
        .deadline(Duration::from_millis(300))
        .submit()
        .await
        .unwrap()
        .gid;
    wait_until("the transaction to be stuck", WAIT, || async {
        client
            .get(&stuck)
            .await
            .ok()
            .filter(|t| t.stuck)
            .map(|_| ())
    })
    .await;
    // A newer one that commits: newest first alone would list it before the stuck one.
    let newer = client
        .two_phase()
        .branch(Branch::new(a.uri(), "debit").payload(Leg::payload("alice", 1)))
        .submit_and_wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(newer.outcome, Outcome::Committed);

    let driver = ChromeDriver::start(&driver_bin);
    let page = browser(&driver, &chromium).await;
    page.goto(&format!("http://{admin}/")).await.unwrap();
    // No token yet: the API says so and the page shows it.
    wait_text(&page, "#message", "the 401 explained", |t| {
        t.contains("Not authenticated")
    })
    .await;

    use_token(&page, "reader").await;
    let first_row = "#tx-rows tr:first-child td.gid";
    wait_text(
        &page,
        first_row,
        "the stuck transaction listed first",
        |t| t == stuck,
    )
    .await;
    let rows = page
        .find_all(Locator::Css("#tx-rows tr"))
        .await
        .unwrap()
        .len();
    assert_eq!(rows, 3, "three transactions listed");
    let first = page
        .find(Locator::Css("#tx-rows tr:first-child"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(first.contains("STUCK"), "{first}");
    wait_text(&page, "#count-stuck", "the stuck count", |t| t == "1").await;
    wait_text(&page, "#count-begun", "the begun count", |t| t == "3").await;

    // The HTML in the handler name is shown as text, and nothing of it ran.
    let listed = page
        .find(Locator::Css("#tx-rows"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listed.contains(XSS_HANDLER), "shown literally: {listed}");
    let ran = page
        .execute("return window.__treatyXss === undefined && document.querySelectorAll('#tx-rows img').length === 0", vec![])
        .await
        .unwrap();
    assert_eq!(ran, serde_json::Value::Bool(true), "an injected tag ran");

    let shot = page.screenshot().await.expect("screenshot");
    let path = std::env::var_os("TREATY_DASHBOARD_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    std::fs::write(&path, &shot).expect("save the screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("dashboard screenshot: {}", path.display());

    // Open it: branches, the reason, the timeline.
    page.find(Locator::Css(&format!("{first_row} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&page, "#tx-state", "the stuck state", |t| {
        t.contains("STUCK")
    })
    .await;
    let reason = wait_text(&page, "#tx-reason", "the reason", |t| !t.is_empty()).await;
    assert!(
        reason.starts_with("deadline passed while branch 1 (credit at"),
        "{reason}"
    );
    let branches = page
        .find(Locator::Id("branch-rows"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        branches.contains(&b.uri()) && branches.contains("aborted"),
        "{branches}"
    );
    wait_text(&page, "#timeline", "the timeline", |t| {
        t.contains("created") && t.contains("seen:")
    })
    .await;

    // A read token cannot retry: the button is refused, visibly.
    click(&page, "retry").await;
    wait_text(&page, "#message", "the refusal", |t| {
        t.contains("Refused") && t.contains("operate")
    })
    .await;
    assert!(client.get(&stuck).await.unwrap().stuck, "nothing changed");
    // The transaction's page, refusal shown, beside the list's screenshot.
    let shot = page.screenshot().await.expect("screenshot");
    let tx_path = path.with_file_name(format!(
        "{}-transaction.png",
        path.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dashboard")
    ));
    std::fs::write(&tx_path, &shot).expect("save the screenshot");
    eprintln!("transaction page screenshot: {}", tx_path.display());

    // The operator: heal bob's instance, retry, and watch it finish.
    use_token(&page, "ops").await;
    wait_text(
        &page,
        "#tx-state",
        "the page to reload with the new token",
        |t| t.contains("STUCK"),
    )
    .await;
    b.restart().unwrap();
    click(&page, "retry").await;
    wait_text(&page, "#message", "the retry sent", |t| {
        t.contains("Retry sent now to 1 branch")
    })
    .await;
    wait_text(&page, "#tx-state", "the transaction to finish", |t| {
        t.starts_with("aborted") && !t.contains("STUCK")
    })
    .await;
    wait_text(&page, "#timeline", "the finish seen", |t| {
        t.contains("seen: aborted")
    })
    .await;
    page.close().await.unwrap();
}
