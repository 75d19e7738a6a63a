// A Go Kafka client (Shopify sarama, as Debian packages it) against Rill's
// Kafka listener: produce with acks=all and snappy, read back with a
// partition consumer, then consume in a group, commit, and read the
// committed offset back. Exits non-zero with the reason on any mismatch.
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/Shopify/sarama"
)

const count = 50

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "sarama: "+format+"\n", args...)
	os.Exit(1)
}

type handler struct {
	mu   sync.Mutex
	seen map[int64]bool
	done chan struct{}
	once sync.Once
}

func (h *handler) Setup(sarama.ConsumerGroupSession) error   { return nil }
func (h *handler) Cleanup(sarama.ConsumerGroupSession) error { return nil }

func (h *handler) ConsumeClaim(session sarama.ConsumerGroupSession, claim sarama.ConsumerGroupClaim) error {
	for message := range claim.Messages() {
		session.MarkMessage(message, "")
		h.mu.Lock()
		h.seen[message.Offset] = true
		seen := len(h.seen)
		h.mu.Unlock()
		if seen >= count {
			h.once.Do(func() { close(h.done) })
		}
	}
	return nil
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: sarama-client BOOTSTRAP TOPIC")
	}
	bootstrap, topic := []string{os.Args[1]}, os.Args[2]
	config := sarama.NewConfig()
	config.Version = sarama.V2_0_0_0
	config.ClientID = "rill-sarama-test"
	config.Producer.RequiredAcks = sarama.WaitForAll
	config.Producer.Return.Successes = true
	config.Producer.Compression = sarama.CompressionSnappy
	config.Producer.Partitioner = sarama.NewManualPartitioner
	config.Consumer.Offsets.Initial = sarama.OffsetOldest
	config.Consumer.Offsets.CommitInterval = 100 * time.Millisecond
	config.Consumer.Return.Errors = true
	config.Metadata.Retry.Backoff = 100 * time.Millisecond

	producer, err := sarama.NewSyncProducer(bootstrap, config)
	if err != nil {
		fail("producer: %v", err)
	}
	for i := 0; i < count; i++ {
		partition, offset, err := producer.SendMessage(&sarama.ProducerMessage{
			Topic:     topic,
			Partition: 0,
			Key:       sarama.StringEncoder("k" + strconv.Itoa(i)),
			Value:     sarama.StringEncoder("v" + strconv.Itoa(i)),
			Headers:   []sarama.RecordHeader{{Key: []byte("h"), Value: []byte(strconv.Itoa(i))}},
		})
		if err != nil {
			fail("send %d: %v", i, err)
		}
		if partition != 0 || offset != int64(i) {
			fail("record %d landed at %d/%d", i, partition, offset)
		}
	}
	if err := producer.Close(); err != nil {
		fail("producer close: %v", err)
	}

	consumer, err := sarama.NewConsumer(bootstrap, config)
	if err != nil {
		fail("consumer: %v", err)
	}
	partition, err := consumer.ConsumePartition(topic, 0, sarama.OffsetOldest)
	if err != nil {
		fail("consume partition: %v", err)
	}
	deadline := time.After(30 * time.Second)
	for i := 0; i < count; i++ {
		select {
		case message := <-partition.Messages():
			if message.Offset != int64(i) || string(message.Key) != "k"+strconv.Itoa(i) ||
				string(message.Value) != "v"+strconv.Itoa(i) {
				fail("read %d: offset %d key %q value %q", i, message.Offset, message.Key, message.Value)
			}
			if len(message.Headers) != 1 || string(message.Headers[0].Key) != "h" ||
				string(message.Headers[0].Value) != strconv.Itoa(i) {
				fail("read %d: headers %v", i, message.Headers)
			}
		case err := <-partition.Errors():
			fail("consume: %v", err)
		case <-deadline:
			fail("read %d of %d records in 30 s", i, count)
		}
	}
	partition.Close()
	consumer.Close()

	group, err := sarama.NewConsumerGroup(bootstrap, "sarama-group", config)
	if err != nil {
		fail("consumer group: %v", err)
	}
	go func() {
		for err := range group.Errors() {
			fmt.Fprintf(os.Stderr, "sarama: group error: %v\n", err)
		}
	}()
	h := &handler{seen: map[int64]bool{}, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	consumed := make(chan error, 1)
	go func() {
		for ctx.Err() == nil {
			if err := group.Consume(ctx, []string{topic}, h); err != nil {
				consumed <- err
				return
			}
		}
		consumed <- nil
	}()
	select {
	case <-h.done:
	case err := <-consumed:
		fail("group consume: %v", err)
	case <-time.After(60 * time.Second):
		fail("the group read %d of %d records in 60 s", len(h.seen), count)
	}
	cancel()
	if err := <-consumed; err != nil {
		fail("group consume: %v", err)
	}
	if err := group.Close(); err != nil {
		fail("group close: %v", err)
	}

	client, err := sarama.NewClient(bootstrap, config)
	if err != nil {
		fail("client: %v", err)
	}
	offsets, err := sarama.NewOffsetManagerFromClient("sarama-group", client)
	if err != nil {
		fail("offset manager: %v", err)
	}
	managed, err := offsets.ManagePartition(topic, 0)
	if err != nil {
		fail("manage partition: %v", err)
	}
	if next, _ := managed.NextOffset(); next != count {
		fail("the group's committed offset is %d, not %d", next, count)
	}
	managed.Close()
	offsets.Close()
	client.Close()
	fmt.Println("sarama ok")
}
