// Java's default HttpClient through tokenrelay listeners. HttpClient.newHttpClient()
// prefers HTTP/2, so on http:// it asks every request to upgrade with
// `Connection: Upgrade, HTTP2-Settings` and `Upgrade: h2c`; tokenrelay ignores the
// upgrade and answers over HTTP/1.1.
//
// Usage: java H2cProbe.java BASE_URL...   (each BASE_URL a listener, e.g. http://127.0.0.1:8081)
// Sends GETs, a POST with `Expect: 100-continue`, a PUT and a DELETE to BASE_URL/echo
// (the demo API, which echoes the request as JSON) and exits 1 if any answer is not a
// 200 over HTTP/1.1 echoing what was sent.

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class H2cProbe {
    static final Duration TIMEOUT = Duration.ofSeconds(20);

    public static void main(String[] args) {
        HttpClient client = HttpClient.newHttpClient();
        int failures = 0;
        int sent = 0;
        for (String base : args) {
            HttpRequest[] requests = {
                get(base + "/echo?probe=1"),
                get(base + "/echo?probe=2"),
                HttpRequest.newBuilder(URI.create(base + "/echo?probe=expect"))
                    .timeout(TIMEOUT)
                    .expectContinue(true)
                    .POST(HttpRequest.BodyPublishers.ofString("hello"))
                    .build(),
                HttpRequest.newBuilder(URI.create(base + "/echo?probe=put"))
                    .timeout(TIMEOUT)
                    .PUT(HttpRequest.BodyPublishers.ofString("put body"))
                    .build(),
                HttpRequest.newBuilder(URI.create(base + "/echo?probe=delete"))
                    .timeout(TIMEOUT)
                    .DELETE()
                    .build(),
                get(base + "/echo?probe=3"),
            };
            for (HttpRequest request : requests) {
                sent++;
                String problem = check(client, request);
                if (problem != null) {
                    failures++;
                    System.err.println("FAIL " + request.method() + " " + request.uri() + ": " + problem);
                }
            }
        }
        System.out.println(sent + " requests, " + failures + " failed");
        System.exit(failures == 0 && sent > 0 ? 0 : 1);
    }

    static HttpRequest get(String url) {
        return HttpRequest.newBuilder(URI.create(url)).timeout(TIMEOUT).GET().build();
    }

    /** Why the exchange failed, or null. */
    static String check(HttpClient client, HttpRequest request) {
        HttpResponse<String> response;
        try {
            response = client.send(request, HttpResponse.BodyHandlers.ofString());
        } catch (Exception e) {
            return e.toString();
        }
        if (response.statusCode() != 200) {
            return "status " + response.statusCode() + ": " + response.body();
        }
        if (response.version() != HttpClient.Version.HTTP_1_1) {
            return "answered over " + response.version();
        }
        String body = response.body();
        if (!body.contains("\"method\":\"" + request.method() + "\"")) {
            return "the upstream saw another method: " + body;
        }
        String query = request.uri().getQuery();
        if (!body.contains("\"query\":\"" + query + "\"")) {
            return "the upstream saw another query: " + body;
        }
        if (request.method().equals("POST") && !body.contains("\"body\":\"hello\"")) {
            return "the body did not arrive: " + body;
        }
        return null;
    }
}
