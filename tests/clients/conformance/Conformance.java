import java.io.BufferedReader;
import java.io.ByteArrayOutputStream;
import java.io.EOFException;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.Socket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.HexFormat;
import java.util.List;
import java.util.Locale;
import java.util.concurrent.atomic.AtomicReference;

/**
 * Conformance clients in Java, the ways a plain JDK app speaks TCP and HTTP,
 * with the JDK's default properties. One JVM serves many cells (the JVM's
 * start-up is paid once): it reads lines
 * {@code ID KIND SCENARIO HOST PORT CELL N FILE RATE} on stdin, runs each on
 * a thread of its own and prints {@code ID RESULT STATUS BYTES SHA256 DETAIL}
 * (the format of tests/clients/conformance/client.py) when it ends. It exits
 * at the end of stdin.
 *
 * <p>KIND: {@code socket} ({@code java.net.Socket}, a writer thread and a
 * reader thread), {@code urlconnection} ({@code HttpURLConnection}),
 * {@code httpclient} ({@code java.net.http.HttpClient}).
 */
public final class Conformance {
    private Conformance() {}

    public static void main(String[] args) throws IOException {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.US_ASCII));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            String[] fields = line.trim().split(" ");
            Thread t = new Thread(() -> run(fields), "cell-" + fields[0]);
            t.setDaemon(true);
            t.start();
        }
        System.exit(0);
    }

    /** A failure and the call it happened in. */
    static final class Failure extends Exception {
        private static final long serialVersionUID = 1L;
        final String where;

        Failure(String where, Throwable cause) {
            super(cause);
            this.where = where;
        }
    }

    /** One cell: what to do, and what was received so far. */
    static final class Cell {
        final String id;
        final String kind;
        final String scenario;
        final String host;
        final int port;
        final String cell;
        final long n;
        final String file;
        final long rate;
        final MessageDigest hash;
        final long start = System.nanoTime();
        long bytes;

        Cell(String[] f) throws NoSuchAlgorithmException {
            id = f[0];
            kind = f[1];
            scenario = f[2];
            host = f[3];
            port = Integer.parseInt(f[4]);
            cell = f[5];
            n = Long.parseLong(f[6]);
            file = f[7];
            rate = Long.parseLong(f[8]);
            hash = MessageDigest.getInstance("SHA-256");
        }

        int chunk() {
            return rate > 0 ? 16 * 1024 : 256 * 1024;
        }

        void add(byte[] b, int off, int len) {
            hash.update(b, off, len);
            bytes += len;
        }

        /** Sleeps until the rate allows what was read so far. */
        void pace() throws InterruptedException {
            if (rate > 0) {
                long due = start + bytes * 1_000_000_000L / rate;
                long ahead = due - System.nanoTime();
                if (ahead > 0) {
                    Thread.sleep(ahead / 1_000_000L, (int) (ahead % 1_000_000L));
                }
            }
        }

        /** The echo and half-close scenarios speak no HTTP. */
        boolean raw() {
            return scenario.equals("duplex") || scenario.equals("half-close");
        }

        String path() {
            return switch (scenario) {
                case "small" -> "/c/" + cell + "/small";
                case "download", "slow-reader" -> "/c/" + cell + "/download/" + n;
                case "upload" -> "/c/" + cell + "/upload";
                case "rst-blocked" -> "/c/" + cell + "/reset-idle";
                case "rst-mid" -> "/c/" + cell + "/reset-mid/" + n;
                default -> throw new IllegalArgumentException("no HTTP path for " + scenario);
            };
        }

        String url() {
            String authority = host.contains(":") ? "[" + host + "]:" + port : host + ":" + port;
            return "http://" + authority + path();
        }

        byte[] payload() throws IOException {
            try (InputStream f = Files.newInputStream(Path.of(file))) {
                byte[] data = f.readNBytes(Math.toIntExact(n));
                if (data.length != n) {
                    throw new IOException(file + " holds " + data.length + " bytes, " + n + " needed");
                }
                return data;
            }
        }

        String result(String status, String detail) {
            String d = detail.replaceAll("\\s+", " ").trim();
            return "RESULT " + status + " " + bytes + " " + HexFormat.of().formatHex(hash.digest()) + " "
                    + (d.isEmpty() ? "-" : d);
        }
    }

    static void run(String[] fields) {
        String result;
        Cell c = null;
        try {
            c = new Cell(fields);
            result = switch (c.kind) {
                case "socket" -> socket(c);
                case "urlconnection" -> urlConnection(c);
                case "httpclient" -> httpClient(c);
                default -> throw new IllegalArgumentException("unknown kind " + c.kind);
            };
        } catch (Failure e) {
            result = c.result(classify(e.getCause()), e.where + ": " + e.getCause());
        } catch (Exception e) {
            result = c == null ? "RESULT error 0 - " + e : c.result(classify(e), "client: " + e);
        }
        synchronized (System.out) {
            System.out.println(fields[0] + " " + result);
            System.out.flush();
        }
    }

    /** ok/eof/reset/eagain/error for an exception and its causes. */
    static String classify(Throwable t) {
        for (Throwable e = t; e != null; e = e.getCause()) {
            String m = String.valueOf(e.getMessage()).toLowerCase(Locale.ROOT);
            if (m.contains("connection reset")) {
                return "reset";
            }
            if (m.contains("temporarily unavailable")) {
                return "eagain";
            }
        }
        for (Throwable e = t; e != null; e = e.getCause()) {
            String m = String.valueOf(e.getMessage()).toLowerCase(Locale.ROOT);
            if (e instanceof EOFException || m.contains("eof") || m.contains("end of file")
                    || m.contains("no bytes") || m.contains("closed")) {
                return "eof";
            }
        }
        return "error";
    }

    /** java.net.Socket: a writer thread sends, this thread reads. */
    static String socket(Cell c) throws Exception {
        List<byte[]> parts;
        if (c.raw()) {
            parts = List.of((c.cell + "\n").getBytes(StandardCharsets.US_ASCII), c.payload());
        } else if (c.scenario.equals("upload")) {
            String head = "POST " + c.path() + " HTTP/1.1\r\nHost: " + c.host + "\r\nContent-Length: " + c.n
                    + "\r\nConnection: close\r\n\r\n";
            parts = List.of(head.getBytes(StandardCharsets.US_ASCII), c.payload());
        } else {
            String head = "GET " + c.path() + " HTTP/1.1\r\nHost: " + c.host + "\r\nConnection: close\r\n\r\n";
            parts = List.of(head.getBytes(StandardCharsets.US_ASCII));
        }
        Socket s;
        try {
            s = new Socket(c.host, c.port);
        } catch (IOException e) {
            throw new Failure("connect", e);
        }
        try (s) {
            AtomicReference<IOException> writeFailure = new AtomicReference<>();
            Thread writer = new Thread(() -> {
                try {
                    OutputStream out = s.getOutputStream();
                    for (byte[] p : parts) {
                        for (int off = 0; off < p.length; off += 256 * 1024) {
                            out.write(p, off, Math.min(256 * 1024, p.length - off));
                        }
                    }
                    out.flush();
                    if (c.raw()) {
                        s.shutdownOutput();
                    }
                } catch (IOException e) {
                    writeFailure.set(e);
                    try {
                        s.close();
                    } catch (IOException ignored) {
                        // The reader learns of it.
                    }
                }
            }, "writer-" + c.id);
            writer.setDaemon(true);
            writer.start();
            String r;
            try {
                r = receive(c, s.getInputStream());
            } catch (Failure e) {
                writer.join(1000);
                if (writeFailure.get() != null) {
                    throw new Failure("writer write", writeFailure.get());
                }
                throw e;
            }
            writer.join();
            if (writeFailure.get() != null) {
                throw new Failure("writer write", writeFailure.get());
            }
            return r;
        }
    }

    /** Reads to the end of the stream: the HTTP body after the head, or everything. */
    static String receive(Cell c, InputStream in) throws Failure, InterruptedException {
        byte[] buf = new byte[c.chunk()];
        ByteArrayOutputStream head = new ByteArrayOutputStream();
        long length = c.raw() ? -2 : -1;
        while (true) {
            int r;
            try {
                r = in.read(buf);
            } catch (IOException e) {
                throw new Failure("read", e);
            }
            if (r < 0) {
                break;
            }
            if (length == -1) {
                head.write(buf, 0, r);
                byte[] h = head.toByteArray();
                int end = indexOf(h, "\r\n\r\n".getBytes(StandardCharsets.US_ASCII));
                if (end < 0) {
                    continue;
                }
                String[] lines = new String(h, 0, end, StandardCharsets.ISO_8859_1).split("\r\n");
                if (!lines[0].startsWith("HTTP/1.1 200")) {
                    return c.result("error", "status: " + lines[0]);
                }
                for (String line : lines) {
                    if (line.regionMatches(true, 0, "content-length:", 0, 15)) {
                        length = Long.parseLong(line.substring(15).trim());
                    }
                }
                c.add(h, end + 4, h.length - end - 4);
                c.pace();
                continue;
            }
            c.add(buf, 0, r);
            c.pace();
        }
        if (!c.raw() && (length < 0 || c.bytes < length)) {
            return c.result("eof", "read: clean EOF after " + c.bytes + " of " + length + " body bytes");
        }
        return c.result("ok", "-");
    }

    static int indexOf(byte[] hay, byte[] needle) {
        outer:
        for (int i = 0; i + needle.length <= hay.length; i++) {
            for (int j = 0; j < needle.length; j++) {
                if (hay[i + j] != needle[j]) {
                    continue outer;
                }
            }
            return i;
        }
        return -1;
    }

    /** Reads a response body; shorter than its Content-Length is an EOF. */
    static String readBody(Cell c, InputStream in, long length) throws Failure, InterruptedException {
        byte[] buf = new byte[c.chunk()];
        try (in) {
            for (int r = in.read(buf); r >= 0; r = in.read(buf)) {
                c.add(buf, 0, r);
                c.pace();
            }
        } catch (IOException e) {
            throw new Failure("read", e);
        }
        if (length >= 0 && c.bytes < length) {
            return c.result("eof", "read: clean EOF after " + c.bytes + " of " + length + " body bytes");
        }
        return c.result("ok", "-");
    }

    static String urlConnection(Cell c) throws Exception {
        HttpURLConnection conn = (HttpURLConnection) URI.create(c.url()).toURL().openConnection(Proxy.NO_PROXY);
        int status;
        try {
            if (c.scenario.equals("upload")) {
                byte[] data = c.payload();
                conn.setRequestMethod("POST");
                conn.setDoOutput(true);
                conn.setFixedLengthStreamingMode(data.length);
                try (OutputStream out = conn.getOutputStream()) {
                    out.write(data);
                }
            }
            status = conn.getResponseCode();
        } catch (IOException e) {
            throw new Failure("request", e);
        }
        if (status != 200) {
            return c.result("error", "status " + status);
        }
        InputStream in;
        try {
            in = conn.getInputStream();
        } catch (IOException e) {
            throw new Failure("getInputStream", e);
        }
        return readBody(c, in, conn.getContentLengthLong());
    }

    static String httpClient(Cell c) throws Exception {
        HttpClient client = HttpClient.newBuilder().proxy(ProxySelector.of(null)).build();
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(c.url()));
        if (c.scenario.equals("upload")) {
            request.POST(HttpRequest.BodyPublishers.ofByteArray(c.payload()));
        }
        HttpResponse<InputStream> r;
        try {
            r = client.send(request.build(), HttpResponse.BodyHandlers.ofInputStream());
        } catch (IOException e) {
            throw new Failure("send", e);
        }
        if (r.statusCode() != 200) {
            return c.result("error", "status " + r.statusCode());
        }
        return readBody(c, r.body(), r.headers().firstValueAsLong("content-length").orElse(-1));
    }
}
