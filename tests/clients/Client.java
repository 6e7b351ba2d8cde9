import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.ByteArrayOutputStream;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.Socket;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;

/**
 * Keep-alive HTTP GETs made the way a plain JDK app makes them, with the
 * JDK's default properties (on Linux its sockets are AF_INET6, an IPv4
 * destination is connected to as ::ffff:a.b.c.d).
 *
 * <p>{@code java Client socket|httpclient HOST PORT N}: N requests on one
 * connection; the bodies, in order, on stdout.
 */
public final class Client {
    public static void main(String[] args) throws Exception {
        String kind = args[0];
        String host = args[1];
        int port = Integer.parseInt(args[2]);
        int requests = Integer.parseInt(args[3]);
        OutputStream out = new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 1 << 16);
        switch (kind) {
            case "socket" -> socket(host, port, requests, out);
            case "httpclient" -> httpClient(host, port, requests, out);
            default -> throw new IllegalArgumentException("unknown client kind " + kind);
        }
        out.flush();
    }

    /** java.net.Socket, HTTP/1.1 by hand. */
    private static void socket(String host, int port, int requests, OutputStream out) throws IOException {
        try (Socket s = new Socket(host, port)) {
            s.setSoTimeout(30_000);
            InputStream in = new BufferedInputStream(s.getInputStream());
            OutputStream w = s.getOutputStream();
            byte[] request = ("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n").getBytes(StandardCharsets.US_ASCII);
            for (int i = 0; i < requests; i++) {
                w.write(request);
                w.flush();
                String status = line(in);
                if (!status.startsWith("HTTP/1.1 200")) {
                    throw new IOException("request " + i + ": " + status);
                }
                int length = -1;
                for (String h = line(in); !h.isEmpty(); h = line(in)) {
                    if (h.regionMatches(true, 0, "content-length:", 0, 15)) {
                        length = Integer.parseInt(h.substring(15).trim());
                    }
                }
                if (length < 0) {
                    throw new IOException("request " + i + ": no Content-Length");
                }
                byte[] body = in.readNBytes(length);
                if (body.length != length) {
                    throw new IOException("request " + i + ": body cut at " + body.length + " of " + length);
                }
                out.write(body);
            }
        }
    }

    private static String line(InputStream in) throws IOException {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        for (int c = in.read(); c != '\n'; c = in.read()) {
            if (c < 0) {
                throw new IOException("connection closed mid-response");
            }
            if (c != '\r') {
                b.write(c);
            }
        }
        return b.toString(StandardCharsets.US_ASCII);
    }

    /** java.net.http.HttpClient, defaults (HTTP/2 asked by upgrade, HTTP/1.1 kept). */
    private static void httpClient(String host, int port, int requests, OutputStream out) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        String authority = host.contains(":") ? "[" + host + "]:" + port : host + ":" + port;
        URI uri = URI.create("http://" + authority + "/");
        for (int i = 0; i < requests; i++) {
            HttpResponse<byte[]> r = client.send(HttpRequest.newBuilder(uri).build(), HttpResponse.BodyHandlers.ofByteArray());
            if (r.statusCode() != 200) {
                throw new IOException("request " + i + ": status " + r.statusCode());
            }
            out.write(r.body());
        }
    }
}
