package io.kstore.baseline;

import java.util.ArrayList;
import java.util.List;

/** Command-line flags. */
final class Options {
    static final String USAGE =
            """
            usage: java -jar kafka-streams-baseline.jar --bootstrap HOST:PORT --input-topic TOPIC
                   --application-id ID --instance-id ID --state-dir DIR [options]

              --bootstrap HOST:PORT        Kafka bootstrap servers (required)
              --input-topic TOPIC          the keyed JSON order events (required)
              --application-id ID          Kafka Streams application.id: the consumer group and
                                           the prefix of its topics (required)
              --instance-id ID             this instance: its group.instance.id (static
                                           membership) and node_id in answers (required)
              --state-dir DIR              Kafka Streams state.dir (required)
              --grpc-host HOST             where gRPC listens and what application.server
                                           names (default 127.0.0.1)
              --grpc-port PORT             gRPC port; 0 picks a free one (default 0)
              --standbys N                 num.standby.replicas (default 0)
              --threads N                  num.stream.threads (default 1)
              --partitions-hint N          the input's partition count, if known (checked
                                           against the topic; default: read from the topic)
              --commit-interval-ms MS      commit.interval.ms (default 100, the EOS default)
              --cache-bytes N              statestore.cache.max.bytes (default 10485760)
              --block-cache-bytes N        RocksDB block cache shared by every store of the
                                           process (default 268435456, as kstore's)
              --write-buffer-bytes N       RocksDB memtables of every store, charged to that
                                           cache (default 134217728, as kstore's)
              --session-timeout-ms MS      the consumer's session.timeout.ms (default: Kafka's)
              --max-value-bytes N          larger input values go to the dead-letter topic
                                           (default 262144, as kstore's)
              --max-key-bytes N            larger input keys go to the dead-letter topic
                                           (default 65536, as kstore's)
              --partition-mismatch warn|dlq  a key on another partition than Kafka's
                                           partitioner gives it: log it, or dead-letter it
                                           (default warn, as kstore's)
              --replication-factor N       replication.factor of the topics it creates
                                           (default -1: the broker's default)
              --set KEY=VALUE              any other Kafka Streams, consumer or producer
                                           setting (repeatable)
            """;

    String bootstrap;
    String inputTopic;
    String applicationId;
    String instanceId;
    String stateDir;
    String grpcHost = "127.0.0.1";
    int grpcPort = 0;
    int standbys = 0;
    int threads = 1;
    int partitionsHint = 0;
    long commitIntervalMs = 100;
    long cacheBytes = 10L << 20;
    long blockCacheBytes = 256L << 20;
    long writeBufferBytes = 128L << 20;
    Integer sessionTimeoutMs;
    int maxValueBytes = 256 << 10;
    int maxKeyBytes = 64 << 10;
    boolean partitionMismatchDlq = false;
    short replicationFactor = -1;
    final List<String[]> extra = new ArrayList<>();

    /** Parses the flags; throws IllegalArgumentException with what is wrong. */
    static Options parse(String[] args) {
        Options o = new Options();
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            String value;
            int eq = flag.indexOf('=');
            if (flag.startsWith("--") && eq > 0) {
                value = flag.substring(eq + 1);
                flag = flag.substring(0, eq);
            } else if (flag.equals("--help") || flag.equals("-h")) {
                throw new IllegalArgumentException("");
            } else {
                if (i + 1 >= args.length) {
                    throw new IllegalArgumentException(flag + " needs a value");
                }
                value = args[++i];
            }
            switch (flag) {
                case "--bootstrap" -> o.bootstrap = value;
                case "--input-topic" -> o.inputTopic = value;
                case "--application-id" -> o.applicationId = value;
                case "--instance-id" -> o.instanceId = value;
                case "--state-dir" -> o.stateDir = value;
                case "--grpc-host" -> o.grpcHost = value;
                case "--grpc-port" -> o.grpcPort = integer(flag, value, 0, 65535);
                case "--standbys" -> o.standbys = integer(flag, value, 0, 100);
                case "--threads" -> o.threads = integer(flag, value, 1, 64);
                case "--partitions-hint" -> o.partitionsHint = integer(flag, value, 0, 1 << 20);
                case "--commit-interval-ms" -> o.commitIntervalMs = integer(flag, value, 1, 600_000);
                case "--cache-bytes" -> o.cacheBytes = longValue(flag, value);
                case "--block-cache-bytes" -> o.blockCacheBytes = longValue(flag, value);
                case "--write-buffer-bytes" -> o.writeBufferBytes = longValue(flag, value);
                case "--session-timeout-ms" -> o.sessionTimeoutMs = integer(flag, value, 1, 3_600_000);
                case "--max-value-bytes" -> o.maxValueBytes = integer(flag, value, 1, 64 << 20);
                case "--max-key-bytes" -> o.maxKeyBytes = integer(flag, value, 1, 1 << 20);
                case "--partition-mismatch" -> {
                    switch (value) {
                        case "warn" -> o.partitionMismatchDlq = false;
                        case "dlq" -> o.partitionMismatchDlq = true;
                        default -> throw new IllegalArgumentException(
                                "--partition-mismatch takes warn or dlq, not " + value);
                    }
                }
                case "--replication-factor" -> o.replicationFactor = (short) integer(flag, value, -1, 32);
                case "--set" -> {
                    int split = value.indexOf('=');
                    if (split <= 0) {
                        throw new IllegalArgumentException("--set takes KEY=VALUE, not " + value);
                    }
                    o.extra.add(new String[] {value.substring(0, split), value.substring(split + 1)});
                }
                default -> throw new IllegalArgumentException("unknown flag " + flag);
            }
        }
        require(o.bootstrap, "--bootstrap");
        require(o.inputTopic, "--input-topic");
        require(o.applicationId, "--application-id");
        require(o.instanceId, "--instance-id");
        require(o.stateDir, "--state-dir");
        return o;
    }

    private static void require(String value, String flag) {
        if (value == null || value.isEmpty()) {
            throw new IllegalArgumentException(flag + " is required");
        }
    }

    private static int integer(String flag, String value, int min, int max) {
        long parsed = longValue(flag, value);
        if (parsed < min || parsed > max) {
            throw new IllegalArgumentException(flag + " must be in " + min + ".." + max + ", not " + value);
        }
        return (int) parsed;
    }

    private static long longValue(String flag, String value) {
        try {
            return Long.parseLong(value);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(flag + " takes a number, not " + value);
        }
    }

    /** The dead-letter topic, named as kstore names its own: {@code <app>-dlq}. */
    String dlqTopic() {
        return applicationId + "-dlq";
    }

    /** The alert topic, named as kstore names its own: {@code <app>-alerts}. */
    String alertsTopic() {
        return applicationId + "-alerts";
    }
}
